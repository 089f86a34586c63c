"""The layers; importing this package registers them in mmengine's root MODELS."""
from .base import SmallBatchNorm, TransformedWeightConv, registered
from .brn import BRN
from .cbn import CBN
from .conv import CenConv, WSConv
from .mabn import MABN

__all__ = ['BRN', 'CBN', 'CenConv', 'MABN', 'WSConv', 'conv_types', 'norm_types']


def norm_types():
    """name -> class of every registered norm layer (a :class:`SmallBatchNorm`):
    MABN, BRN, CBN and any a user registers."""
    return registered(SmallBatchNorm)


def conv_types():
    """name -> class of every registered conv with a transformed weight:
    CenConv, WSConv and any a user registers."""
    return registered(TransformedWeightConv)
