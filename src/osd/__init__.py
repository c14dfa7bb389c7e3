"""osd: memory-efficient subspace optimizers (Online Subspace Descent, GaLore, random
projection) for PyTorch. Imports torch only."""

from osd.groups import param_groups
from osd.layerwise import Layerwise
from osd.optim import SGD, Adafactor, AdamW, AdamW8bit, Lion, SubspaceOptimizer
from osd.projectors import PROJ_OPTIMIZERS, PROJECTORS, SIDES

__version__ = "0.1.0"

__all__ = [
    "AdamW",
    "AdamW8bit",
    "Adafactor",
    "Layerwise",
    "Lion",
    "SGD",
    "SubspaceOptimizer",
    "param_groups",
    "PROJECTORS",
    "PROJ_OPTIMIZERS",
    "SIDES",
]
