"""The public surface is deliberate: pinned here, so that a change to it is a visible decision."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest

import vtprune
from vtprune.registry import registered_configs

PUBLIC = {
    "wrap",
    "unwrap",
    "get_pruner",
    "is_wrapped",
    "PruneConfig",
    "VisualTokenConfig",
    "FasterVLMConfig",
    "RandomConfig",
    "FastVConfig",
    "StaticExitConfig",
    "DyVTEConfig",
    "PoolConfig",
    "CrossLMMConfig",
    "ScheduleConfig",
    "DARTConfig",
    "PDropConfig",
    "VisionZipConfig",
    "DivPruneConfig",
    "CDPrunerConfig",
    "SampleSelection",
    "UsageError",
    "available_methods",
    "supported_model_types",
}


def test_all_is_pinned_and_importable():
    assert set(vtprune.__all__) == PUBLIC
    for name in vtprune.__all__:
        assert getattr(vtprune, name) is not None


def test_every_registered_method_exports_its_config():
    exported = {getattr(vtprune, name) for name in vtprune.__all__}
    configs = registered_configs()
    assert sorted(configs) == vtprune.available_methods()
    for method, cls in configs.items():
        assert cls in exported, f"{cls.__name__} ({method}) is not exported from vtprune"
        assert cls.method == method


@pytest.mark.parametrize("method", sorted(registered_configs()))
def test_default_configs_round_trip_with_a_version(method, tmp_path):
    cls = registered_configs()[method]
    config = cls()
    data = config.to_dict()
    assert data["method"] == method and data["version"] == cls.version
    assert vtprune.PruneConfig.from_dict(data) == config
    assert vtprune.PruneConfig.from_json(config.to_json(tmp_path / "c.json")) == config
    with pytest.raises(vtprune.UsageError, match="version"):
        vtprune.PruneConfig.from_dict(data | {"version": cls.version + 1})
    assert all(f.name != "method" for f in dataclasses.fields(cls))


def test_import_graph_has_no_cycle_and_no_upward_import():
    """The engine (runtime/) imports no method and no family; calibration (tune/) sits above the API."""
    path = Path(__file__).parents[1] / "scripts" / "import_graph.py"
    spec = importlib.util.spec_from_file_location("import_graph", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    edges = module.graph(Path(vtprune.__file__).parent)
    assert set(edges) <= set(module.RANK), "a new room needs a layer in scripts/import_graph.py"
    assert module.cycles(edges) == []
    assert module.upward(edges) == []
    assert not edges["runtime"] & {"methods", "integrations", "api", "tune", "eval"}
