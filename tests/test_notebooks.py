"""The demo notebooks run top to bottom (code cells executed in order, outputs ignored), headless."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
# one notebook per capability (issue 16); a new capability adds its own
CAPABILITIES = {
    "quickstart",
    "compare_methods",
    "accuracy_vs_speed",
    "dyvte",
    "schedule_search",
    "crosslmm",
    "bring_your_own_model",
}


def test_every_capability_has_a_notebook():
    assert CAPABILITIES <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    import matplotlib

    matplotlib.use("Agg")  # figures are drawn, not shown
    import matplotlib.pyplot as plt

    namespace = {}
    try:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                exec(compile("".join(cell["source"]), f"{path.name}", "exec"), namespace)
    finally:
        plt.close("all")
