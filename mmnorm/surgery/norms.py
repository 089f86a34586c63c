"""Which norm layers the model surgery knows, by what their forward computes.

``convert`` and ``fuse`` replace or fold a norm only when they know its whole
forward; :func:`known_norm` says what a module is:

* ``'batch_norm'``: BatchNorm's function, nothing more: ``nn.BatchNorm1d/2d/3d``
  and ``nn.SyncBatchNorm`` and subclasses that keep their ``forward``;
* ``'batch_norm'`` with ``after=('drop', 'act')``: timm's ``BatchNormAct2d`` and
  ``SyncBatchNormAct``, BatchNorm followed by the module's own ``drop`` and
  ``act`` children, which a replacement keeps;
* ``'frozen'``: BatchNorm's inference with fixed buffers (torchvision's and
  MMDetection's ``FrozenBatchNorm2d``; timm's ``FrozenBatchNormAct2d``, then
  its ``drop`` and ``act``);
* ``'mmnorm'``: MABN, BRN, CBN;
* ``'unknown'``: any other ``_BatchNorm`` subclass (its forward is its own), left
  alone and reported with that reason.

Other modules (convs, GroupNorm, activations) are not norms of this family: None.
"""
import sys
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers.base import SmallBatchNorm

# (module, class name): norm + activation classes whose forward is BatchNorm's,
# then self.drop, then self.act.
_NORM_ACT_CLASSES = (('timm.layers.norm_act', 'BatchNormAct2d'),
                     ('timm.layers.norm_act', 'SyncBatchNormAct'))
# Frozen BatchNorms that are not _BatchNorm subclasses: weight, bias,
# running_mean, running_var buffers and BatchNorm's inference.
_FROZEN_CLASSES = (('mmdet.models.layers.brick_wrappers', 'FrozenBatchNorm2d'),
                   ('torchvision.ops.misc', 'FrozenBatchNorm2d'))
_FROZEN_ACT_CLASSES = (('timm.layers.norm_act', 'FrozenBatchNormAct2d'),)
_BATCH_NORM_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


class Norm(NamedTuple):
    """What :func:`known_norm` knows of a module."""
    kind: str  # 'batch_norm', 'frozen', 'mmnorm' or 'unknown'
    after: tuple = ()  # names of children applied after the normalisation
    reason: str = ''  # for 'unknown': why it is left alone


def _loaded(classes):
    """The classes of ``classes`` whose module is imported (an instance can
    only exist if it is: nothing is imported here)."""
    found = []
    for module_name, class_name in classes:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, class_name):
            found.append(getattr(module, class_name))
    return tuple(found)


def frozen_types():
    """The frozen BatchNorm classes among the imported modules."""
    return _loaded(_FROZEN_CLASSES + _FROZEN_ACT_CLASSES)


def channels(norm):
    """The number of channels of a BatchNorm-family module (torchvision's
    FrozenBatchNorm2d has no ``num_features``)."""
    count = getattr(norm, 'num_features', None)
    if count is None and isinstance(getattr(norm, 'running_var', None), torch.Tensor):
        count = norm.running_var.numel()
    return count


def known_norm(module):
    """A :class:`Norm` for a BatchNorm-family ``module``, None for anything else."""
    if isinstance(module, SmallBatchNorm):
        return Norm('mmnorm')
    if isinstance(module, _loaded(_FROZEN_ACT_CLASSES)):
        return Norm('frozen', after=('drop', 'act'))
    if isinstance(module, frozen_types()):
        return Norm('frozen')
    if not isinstance(module, _BatchNorm):
        return None
    cls = type(module)
    if cls in _loaded(_NORM_ACT_CLASSES) and all(
            isinstance(getattr(module, name, None), nn.Module) for name in ('drop', 'act')):
        return Norm('batch_norm', after=('drop', 'act'))
    if cls.forward in _BATCH_NORM_FORWARDS:
        return Norm('batch_norm')
    return Norm('unknown', reason=f'{cls.__module__}.{cls.__name__} has its own forward, which '
                                  'mmnorm does not know')

