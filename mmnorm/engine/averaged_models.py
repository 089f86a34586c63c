"""Averaged models (mmengine's ``EMAHook`` with ``ExponentialMovingAverage``,
MMDetection's ``ExpMomentumEMA``, any ``BaseAveragedModel``) with mmnorm's
layers, installed when mmnorm is imported.

An averaged model deep-copies the model before the first step, then after
every step averages (``update_buffers=True``) or copies (``False``) its
buffers into the copy with ``tensor.data.copy_``. Two things of mmnorm's
layers do not fit that: CBN allocates its ring at its first step, with the
feeding conv's shape, after the copy was made; and averaging a counter, a
window of recent statistics or a ring slot means nothing. So every update of a
``BaseAveragedModel`` here first gives each mmnorm layer of the copy the
buffer shapes of the model's (and renews the averaged model's list of its
tensors), runs mmengine's update, then copies every buffer but the running
statistics (``AVERAGED_BUFFERS``): with ``update_buffers=True`` the running
statistics are averaged and the rest copied; with ``False`` everything is
copied, as mmengine documents. See docs/layer_state.md, "Averaged models".
"""
from mmengine.model import BaseAveragedModel

from ..layers import SmallBatchNorm

_UPDATE = BaseAveragedModel.update_parameters


def layer_pairs(averaged, source):
    """(layer of ``averaged``, the same layer of ``source``) for every mmnorm
    layer, matched by name."""
    theirs = dict(source.named_modules())
    for name, layer in averaged.named_modules():
        other = theirs.get(name)
        if isinstance(layer, SmallBatchNorm) and isinstance(other, SmallBatchNorm):
            yield layer, other


def update_parameters(self, model):
    """``BaseAveragedModel.update_parameters`` with mmnorm's layers."""
    pairs = list(layer_pairs(self.module, model))
    for averaged, source in pairs:
        averaged.take_buffer_shapes(source)
    if self.update_buffers:  # the tensors mmengine listed in __init__, renewed where replaced
        current = self.module.state_dict()
        if any(current[key].data_ptr() != value.data_ptr() or current[key].shape != value.shape
               for key, value in self.avg_parameters.items()):
            self.avg_parameters = current
    _UPDATE(self, model)
    for averaged, source in pairs:
        averaged.copy_unaveraged_buffers(source)


update_parameters.__wrapped__ = _UPDATE
BaseAveragedModel.update_parameters = update_parameters
