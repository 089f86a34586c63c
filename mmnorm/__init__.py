"""mmnorm: small-batch normalization for MMDetection 3.x.

``import mmnorm`` (or ``custom_imports=dict(imports=['mmnorm'])`` in a config)
registers the layers in mmengine's root ``MODELS`` registry, so any scope finds
them: norm layers ``MABN``, ``BRN``; conv layers ``CenConv``, ``WSConv``.
"""
from . import sync_bn  # noqa: F401  (keeps mmnorm layers under cfg.sync_bn)
from .layers import BRN, MABN, CenConv, WSConv

__version__ = '0.1.0'
__all__ = ['BRN', 'CenConv', 'MABN', 'WSConv']
