import os
import shutil
import sys

# Test modules in sub-folders import the shared references (helpers.py) from here.
sys.path.insert(0, os.path.dirname(__file__))

# Triton kernels run through the interpreter on machines without a GPU (CI, laptops).
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
