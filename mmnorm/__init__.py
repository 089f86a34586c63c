"""mmnorm: small-batch normalization for MMDetection 3.x.

``import mmnorm`` (or ``custom_imports=dict(imports=['mmnorm'])`` in a config)
registers the layers in mmengine's root ``MODELS`` registry, so any scope finds
them: norm layers ``MABN``, ``CBN``, ``BRN``; conv layers ``CenConv``,
``WSConv``; CBN's burn-in hook; and the Fashion-MNIST data set, classifier and
metric of the small-scale studies.

``mmnorm.fuse(model)`` folds a model for inference (no mmnorm module left, see
:mod:`mmnorm.deploy`); ``mmnorm.convert(model, norm=..., conv=...)`` turns the
BatchNorms (and the convs feeding them) of any PyTorch model into these layers
(:mod:`mmnorm.convert`).
"""
from . import classifier, fashion_mnist, hooks, sync_bn  # noqa: F401  (registration; see sync_bn)
from .convert import convert
from .deploy import fuse
from .layers import BRN, CBN, MABN, CenConv, WSConv

__version__ = '0.1.0'
__all__ = ['BRN', 'CBN', 'CenConv', 'MABN', 'WSConv', 'convert', 'fuse']
