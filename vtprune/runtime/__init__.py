"""The engine: patches, the prefill pipeline, compaction, in-LLM dropping, probes and selection.

Nothing here names a method or a model family: methods contribute
:class:`~vtprune.runtime.parts.MethodParts`, families answer layout questions.
"""

from .layer_drop import LayerEngine, LayerPlan
from .parts import MethodParts, VisionProbe, VisualUnit
from .pruner import Pruner
from .selection import SampleSelection, keep_count
from .statistics import register_statistic

__all__ = [
    "Pruner",
    "MethodParts",
    "VisionProbe",
    "VisualUnit",
    "LayerPlan",
    "LayerEngine",
    "SampleSelection",
    "keep_count",
    "register_statistic",
]
