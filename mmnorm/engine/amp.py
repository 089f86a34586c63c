"""Mixed precision (``--amp``) on machines without an accelerator.

* :class:`CPUAmpOptimWrapper` - mmengine's ``AmpOptimWrapper`` with bfloat16
  autocast and PyTorch's CPU ``GradScaler``.
* :func:`run_mmcv_ops_in_float32` - mmcv's CPU kernels of NMS and RoIAlign take
  float32 only; under CPU autocast they run in float32 and hand back the
  low-precision dtype, as their CUDA kernels do.
* :func:`use_cpu_amp` - what ``mmnorm.engine.runner.build_runner`` calls: switch a
  config that asks for ``AmpOptimWrapper`` to the two above when the run has
  no accelerator.
"""
import functools
import importlib

import torch
from mmengine.device import get_device
from mmengine.logging import print_log
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

from ..compat import require_torch

__all__ = ['CPUAmpOptimWrapper', 'FLOAT32_MMCV_OPS', 'run_mmcv_ops_in_float32', 'use_cpu_amp']


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(AmpOptimWrapper):
    """``AmpOptimWrapper`` for training on the CPU (``--amp`` without an
    accelerator): bfloat16 autocast and ``torch.amp.GradScaler('cpu')``.

    mmengine 0.10.7's ``AmpOptimWrapper.__init__`` asserts that CUDA, NPU,
    MLU or MUSA is available and builds ``torch.cuda.amp.GradScaler``. The rest
    of the class works on the CPU unchanged: its ``optim_context`` enters
    ``mmengine.runner.amp.autocast``, which on the CPU is
    ``torch.autocast('cpu', dtype=torch.bfloat16)`` (the only CPU dtype it
    accepts), and ``backward``/``step``/``state_dict`` drive the scaler. So this
    subclass only replaces the constructor: same arguments, ``dtype`` must be
    None or bfloat16, the scaler is PyTorch's CPU ``GradScaler`` (torch >= 2.3).

    bfloat16 has float32's exponent range, so gradients do not underflow and
    loss scaling is not needed for range; ``loss_scale='dynamic'`` (what
    ``--amp`` sets, as in MMDetection) is kept because the scaler also skips
    an optimizer step whose gradients are inf/NaN and then lowers the scale.
    Parameters, buffers (the norm layers' statistics) and the checkpoint stay
    float32: autocast only changes the dtype of the ops' outputs.
    """

    def __init__(self, loss_scale='dynamic', dtype=None, use_fsdp=False, **kwargs):
        name = type(self).__name__
        if use_fsdp:
            raise ValueError(f'{name}: use_fsdp=True is not supported on the CPU')
        if dtype not in (None, 'bfloat16', torch.bfloat16):
            raise ValueError(f'{name}: dtype must be bfloat16 on the CPU (the only dtype '
                             f'mmengine runs CPU autocast in), got {dtype!r}')
        if loss_scale == 'dynamic':
            scaler_args, fixed_scale = {}, None
        elif isinstance(loss_scale, float):
            scaler_args, fixed_scale = dict(init_scale=loss_scale), loss_scale
        elif isinstance(loss_scale, dict):
            scaler_args, fixed_scale = dict(loss_scale), None
        else:
            raise TypeError(f'{name}: loss_scale must be "dynamic", a float or a dict of '
                            f'GradScaler arguments, got {loss_scale!r}')
        require_torch((2, 3), f'{name} (mixed precision without a GPU: the CPU GradScaler)')
        # Skips AmpOptimWrapper.__init__ (the accelerator assertion, the CUDA
        # scaler) and sets the attributes it would set.
        OptimWrapper.__init__(self, **kwargs)
        self._scale_update_param = fixed_scale
        self.loss_scaler = torch.amp.GradScaler('cpu', **scaler_args)
        self.cast_dtype = torch.bfloat16


#: mmcv 2.1.0 autograd Functions that Mask R-CNN runs under autocast and whose
#: CPU kernels take float32 only ("expected scalar type Float but found
#: BFloat16"): NMS (RPN proposals) and RoIAlign (RoI features, mask targets).
#: Their CUDA kernels also take half, which is why GPU AMP needs nothing here.
FLOAT32_MMCV_OPS = (('mmcv.ops.nms', 'NMSop'), ('mmcv.ops.roi_align', 'RoIAlignFunction'))
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _in_float32(step):
    """Wrap ``step(ctx, *args)``, a Function's forward or backward, for CPU
    kernels that take float32 only: float16/bfloat16 CPU tensors among
    ``args`` go in as float32, ``step`` runs with CPU autocast off, and the
    floating tensors it returns come back in the first such argument's dtype
    (as the half-capable CUDA kernels return them; MMDetection's RoI extractor
    writes RoIAlign's output into a tensor of the features' dtype). Calls
    without such arguments are unchanged."""

    def _cast(value, dtype):
        if torch.is_tensor(value) and value.is_floating_point():
            return value.to(dtype)
        if isinstance(value, tuple):
            return tuple(_cast(v, dtype) for v in value)
        return value

    @functools.wraps(step)
    def run(ctx, *args):
        low = next((a.dtype for a in args if torch.is_tensor(a) and a.device.type == 'cpu'
                    and a.dtype in _LOW_PRECISION), None)
        if low is None:
            return step(ctx, *args)
        args = tuple(a.float() if torch.is_tensor(a) and a.dtype in _LOW_PRECISION else a
                     for a in args)
        with torch.autocast('cpu', enabled=False):
            return _cast(step(ctx, *args), low)

    return run


def run_mmcv_ops_in_float32() -> None:
    """Wrap the forward and backward of the :data:`FLOAT32_MMCV_OPS` with
    :func:`_in_float32`, once per process."""
    for module_name, class_name in FLOAT32_MMCV_OPS:
        function = getattr(importlib.import_module(module_name), class_name)
        if getattr(function, '_mmnorm_float32_on_cpu', False):
            continue
        for step in ('forward', 'backward'):
            if step in vars(function):
                setattr(function, step, staticmethod(_in_float32(getattr(function, step))))
        function._mmnorm_float32_on_cpu = True


def use_cpu_amp(cfg) -> None:
    """When ``cfg`` asks for ``AmpOptimWrapper`` and the run has no
    accelerator: use :class:`CPUAmpOptimWrapper` instead and run mmcv's
    float32-only CPU ops in float32 under autocast (logged)."""
    wrapper = cfg.get('optim_wrapper') or {}
    if wrapper.get('type') in ('AmpOptimWrapper', AmpOptimWrapper) and get_device() == 'cpu':
        require_torch((2, 3), '--amp without a GPU (the CPU GradScaler)')
        cfg.optim_wrapper.type = 'CPUAmpOptimWrapper'
        run_mmcv_ops_in_float32()
        ops = ', '.join(name for _, name in FLOAT32_MMCV_OPS)
        print_log('mmnorm: no accelerator: mixed precision runs as bfloat16 autocast on the '
                  f'CPU (optim_wrapper type CPUAmpOptimWrapper); mmcv\'s {ops} run in float32',
                  logger='current')
