"""Keep mmnorm's layers when a config asks MMEngine for SyncBN (``sync_bn=``).

MMEngine's ``convert_sync_batchnorm`` replaces every ``_BatchNorm`` instance by
SyncBatchNorm. The project's layers are ``_BatchNorm`` subclasses (so that
``norm_eval`` and the weight-decay rules see them), so without this module a
distributed run with ``sync_bn='torch'`` would silently turn MABN, CBN and BRN
into SyncBN and train a different model. Importing mmnorm installs
:func:`convert_sync_batchnorm` in the runner in place of MMEngine's: ordinary
BatchNorm layers are still converted; mmnorm's layers are kept, each process
keeping its own statistics as in the papers, and the run's log says so.
"""
import mmengine.runner.runner as mmengine_runner
from mmengine.logging import print_log
from mmengine.model.utils import convert_sync_batchnorm as mmengine_convert_sync_batchnorm
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers._state import SmallBatchNorm


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
