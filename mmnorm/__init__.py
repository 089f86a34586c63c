"""mmnorm: small-batch normalization for MMDetection 3.x.

``import mmnorm`` (or ``custom_imports=dict(imports=['mmnorm'])`` in a config)
registers the layers in mmengine's root ``MODELS`` registry, so any scope finds
them: norm layers ``MABN``, ``CBN``, ``BRN``; conv layers ``CenConv``,
``WSConv``; CBN's burn-in hook; and the Fashion-MNIST data set, classifier and
metric of the small-scale studies.

``mmnorm.fuse(model)`` folds a model for inference (no mmnorm module left, see
:mod:`mmnorm.surgery.fuse`); ``mmnorm.convert(model, norm=..., conv=...)`` turns the
BatchNorms (and the convs feeding them) of any PyTorch model into these layers
(:mod:`mmnorm.surgery.convert`).

The layers, ``convert`` and ``fuse`` need torch >= 2.0 and mmengine only; what
needs mmcv or mmdet (the tools' runtime, checkpoint conversion) is imported
where it is used.
"""
from mmengine.config.utils import MODULE2PACKAGE

from .compat import MINIMUM_TORCH, require_torch

require_torch(MINIMUM_TORCH, 'mmnorm')
# `_base_ = 'mmnorm::DIR/FILE.py'` reads the configs shipped in the package (.mim/configs)
MODULE2PACKAGE.setdefault('mmnorm', 'mmnorm')

from .datasets import fashion_mnist  # noqa: E402, F401  (registration)
from .engine import (  # noqa: E402, F401
                     averaged_models,
                     cbn_burnin_hook,
                     precise_bn,
                     sync_bn,  # (registration)
)
from .layers import BRN, CBN, MABN, CenConv, WSConv  # noqa: E402
from .studies import classifier  # noqa: E402, F401  (registration)
from .surgery.convert import convert  # noqa: E402
from .surgery.fuse import fuse  # noqa: E402

__version__ = '0.1.0'
__all__ = ['BRN', 'CBN', 'CenConv', 'MABN', 'WSConv', 'convert', 'fuse']
