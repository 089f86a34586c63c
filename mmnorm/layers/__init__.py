"""The layers; importing this package registers them in mmengine's root MODELS."""
from .brn import BRN
from .cbn import CBN
from .conv import CenConv, WSConv
from .mabn import MABN

__all__ = ['BRN', 'CBN', 'CenConv', 'MABN', 'WSConv']
