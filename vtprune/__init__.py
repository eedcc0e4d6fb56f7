"""vtprune: visual-token pruning for Hugging Face vision-language models.

model = vtprune.wrap(model, "fastervlm", keep_ratio=0.1)   # patched in place
out = model.generate(**inputs)
vtprune.unwrap(model)                                        # original behaviour, bit for bit
"""

from .api import get_pruner, is_wrapped, unwrap, wrap
from .config import PruneConfig, VisualTokenConfig, available_methods
from .errors import UsageError
from .methods.cdpruner import CDPrunerConfig
from .methods.crosslmm import CrossLMMConfig
from .methods.dart import DARTConfig
from .methods.divprune import DivPruneConfig
from .methods.dyvte import DyVTEConfig
from .methods.fastervlm import FasterVLMConfig
from .methods.fastv import FastVConfig
from .methods.pdrop import PDropConfig
from .methods.pool import PoolConfig
from .methods.random import RandomConfig
from .methods.schedule import ScheduleConfig
from .methods.static_exit import StaticExitConfig
from .methods.visionzip import VisionZipConfig
from .registry import supported_model_types
from .runtime.selection import SampleSelection

__version__ = "0.1.0"

__all__ = [
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
]
