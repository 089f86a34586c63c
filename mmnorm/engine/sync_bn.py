"""Keep mmnorm's layers when a config asks MMEngine for SyncBN (``sync_bn=``),
or a script calls PyTorch's ``nn.SyncBatchNorm.convert_sync_batchnorm``.

MMEngine's ``convert_sync_batchnorm`` replaces every ``_BatchNorm`` instance by
SyncBatchNorm. The project's layers are ``_BatchNorm`` subclasses (so that
``norm_eval`` and the weight-decay rules see them), so without this module a
distributed run with ``sync_bn='torch'`` would silently turn MABN, CBN and BRN
into SyncBN and train a different model. Importing mmnorm installs
:func:`convert_sync_batchnorm` in the runner in place of MMEngine's: ordinary
BatchNorm layers are still converted; mmnorm's layers are kept, each process
keeping its own statistics as in the papers, and the run's log says so.

PyTorch's ``nn.SyncBatchNorm.convert_sync_batchnorm`` does the same to any
model (a MABN became a SyncBN without running mean, failing in eval; BRN and
CBN silently trained as SyncBN). Importing mmnorm wraps it the same way:
mmnorm's layers are kept and one ``UserWarning`` per call names them; every
other module is converted exactly as before. ``sync_stats=True`` in a layer's
config is how its statistics are shared across processes.
"""
import warnings

import mmengine.runner.runner as mmengine_runner
from mmengine.logging import print_log
from mmengine.model.utils import convert_sync_batchnorm as mmengine_convert_sync_batchnorm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers.base import SmallBatchNorm


def _convert_keeping(module, implementation, kept):
    if isinstance(module, SmallBatchNorm):
        kept.append(type(module).__name__)
        return module
    if isinstance(module, _BatchNorm):
        return mmengine_convert_sync_batchnorm(module, implementation)
    for name, child in module.named_children():
        module.add_module(name, _convert_keeping(child, implementation, kept))
    return module


def convert_sync_batchnorm(module, implementation='torch'):
    """MMEngine's ``convert_sync_batchnorm`` for every BatchNorm of ``module``
    except mmnorm's layers, which are returned unchanged (and logged)."""
    kept = []
    module = _convert_keeping(module, implementation, kept)
    if kept:
        counts = {name: kept.count(name) for name in sorted(set(kept))}
        print_log(f'sync_bn={implementation!r}: kept {counts} as they are (mmnorm layers keep '
                  'per-process statistics unless their config sets sync_stats=True); other '
                  'BatchNorm layers became SyncBN',
                  logger='current', level=30)
    return module


mmengine_runner.convert_sync_batchnorm = convert_sync_batchnorm


_TORCH_CONVERT = nn.SyncBatchNorm.convert_sync_batchnorm.__func__
_KEPT_BY_TORCH_CONVERT = []  # the layers one (outermost) call kept
_DEPTH = [0]


def _torch_convert_keeping(cls, module, process_group=None):
    """PyTorch's ``convert_sync_batchnorm``, keeping mmnorm's layers (its own
    recursion comes back here for every child); the outermost call warns."""
    outermost = _DEPTH[0] == 0
    _DEPTH[0] += 1
    try:
        if isinstance(module, SmallBatchNorm):
            _KEPT_BY_TORCH_CONVERT.append(type(module).__name__)
            return module
        return _TORCH_CONVERT(cls, module, process_group)
    finally:
        _DEPTH[0] -= 1
        if outermost and _KEPT_BY_TORCH_CONVERT:
            kept = sorted(set(_KEPT_BY_TORCH_CONVERT))
            counts = {name: _KEPT_BY_TORCH_CONVERT.count(name) for name in kept}
            _KEPT_BY_TORCH_CONVERT.clear()
            warnings.warn(f'convert_sync_batchnorm kept the mmnorm layers {counts} as they are '
                          '(they are not BatchNorm; set sync_stats=True in their config to share '
                          'their statistics across processes); other BatchNorms became SyncBN',
                          UserWarning, stacklevel=3)


nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(_torch_convert_keeping)

