"""The layers; importing this package registers them in mmengine's root MODELS."""
from .brn import BRN
from .conv import CenConv, WSConv
from .mabn import MABN

__all__ = ['BRN', 'CenConv', 'MABN', 'WSConv']
