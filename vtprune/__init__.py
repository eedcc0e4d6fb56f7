"""vtprune: visual-token pruning for Hugging Face vision-language models.

model = vtprune.wrap(model, "fastervlm", keep_ratio=0.1)   # patched in place
out = model.generate(**inputs)
vtprune.unwrap(model)                                        # original behaviour, bit for bit
"""

from .api import get_pruner, is_wrapped, unwrap, wrap
from .config import PruneConfig, available_methods
from .methods.fastervlm import FasterVLMConfig
from .methods.random_prune import RandomConfig
from .selection import SampleSelection

__version__ = "0.1.0"

__all__ = [
    "wrap",
    "unwrap",
    "get_pruner",
    "is_wrapped",
    "PruneConfig",
    "FasterVLMConfig",
    "RandomConfig",
    "SampleSelection",
    "available_methods",
]
