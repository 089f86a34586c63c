"""Which implementation runs a layer's training step: ATen ops or fused Triton kernels.

MABN and BRN have two implementations of the training step with the same
results (to float rounding, see docs/kernels.md):

* ``aten``: PyTorch operators, dozens of small ones on (C,) statistics per
  step. The reference; runs everywhere.
* ``triton``: one Triton kernel per direction (forward: statistics, all the
  (C,) bookkeeping and the output; backward: the sums, the bookkeeping and the
  input gradient), each behind one ``mmnorm::`` operator. Needs Triton >= 3.0
  and torch >= 2.4 (``torch.library.custom_op``); Triton compiles the kernels
  on the user's GPU at first use, no nvcc involved.

``MMNORM_KERNELS`` (read when mmnorm is imported, or again by :func:`select`):

* unset or ``auto``: the fused kernels for CUDA tensors where Triton can run
  them, ATen otherwise;
* ``aten``: ATen everywhere;
* ``triton``: the fused kernels for CUDA tensors, and for CPU tensors under
  Triton's interpreter (``TRITON_INTERPRET=1``, how the kernels are tested
  without a GPU); a layer raises if Triton cannot run them.

The choice and its reason are logged once, when the first layer is built
(:func:`announce`). The first fused step of each variant on a device is tried
first on a copy of the layer (:mod:`mmnorm.layers._first_use`): in ``auto`` a
failure or a result that differs from the ATen step's sends that device (or
variant) to the ATen path, with one warning; in ``triton`` it raises.
"""
import contextlib
import importlib
import importlib.metadata
import logging
import os
import re
from typing import Tuple

import torch

from .._torch import CUSTOM_OPS
from ._ops import fused_operator

KERNELS_ENV = 'MMNORM_KERNELS'
MODES = ('auto', 'aten', 'triton')
MINIMUM_TRITON = (3, 0)

# device type -> True (fused), False (ATen), or a str: why the requested fused path cannot run.
_PATHS = {}
_REASON = ['']
_ANNOUNCED = [False]
_MODE = ['auto']
# str(device) -> why the fused kernels failed there (auto: the device takes ATen from then on)
FAILED_DEVICES = {}
_FORCED = [None]  # 'aten' while a first-use check runs its reference step


def triton_problem():
    """Why Triton cannot run the fused kernels here (every reason, '; '-joined),
    or None."""
    problems = []
    try:
        version = importlib.metadata.version('triton')
    except importlib.metadata.PackageNotFoundError:
        problems.append('Triton is not installed (CPU-only torch builds do not ship it)')
    else:
        found = re.match(r'(\d+)\.(\d+)', version)
        if found is None or tuple(map(int, found.groups())) < MINIMUM_TRITON:
            need = '.'.join(map(str, MINIMUM_TRITON))
            problems.append(f'Triton {version} is older than {need}')
    if not CUSTOM_OPS:
        problems.append(f'torch {torch.__version__} has no torch.library.custom_op '
                        '(torch >= 2.4)')
    return '; '.join(problems) or None


def select(mode=None):
    """Choose the implementation per device type from ``mode`` (default: the
    ``MMNORM_KERNELS`` environment variable, ``auto`` if unset); returns the
    sentence that says which and why. Layers built afterwards log it again."""
    mode = (os.environ.get(KERNELS_ENV) or 'auto') if mode is None else mode
    if mode not in MODES:
        raise ValueError(f'{KERNELS_ENV}={mode!r}: expected one of {", ".join(MODES)}')
    problem = triton_problem()
    interpret = os.environ.get('TRITON_INTERPRET') == '1'
    _PATHS.clear()
    FAILED_DEVICES.clear()
    _MODE[0] = mode
    if mode == 'aten':
        reason = f'{KERNELS_ENV}=aten: every layer takes the ATen path'
    elif problem is not None:
        reason = f'every layer takes the ATen path: {problem}'
        if mode == 'triton':
            _PATHS['cuda'] = _PATHS['cpu'] = f'{KERNELS_ENV}=triton, but {problem}'
    else:
        _PATHS['cuda'] = True
        reason = 'CUDA tensors take the fused Triton kernels'
        if mode == 'triton' and interpret:
            _PATHS['cpu'] = True
            reason += ', CPU tensors too (TRITON_INTERPRET=1: Triton\'s interpreter)'
        elif mode == 'triton':
            _PATHS['cpu'] = (f'{KERNELS_ENV}=triton runs CPU tensors only under Triton\'s '
                             'interpreter: set TRITON_INTERPRET=1 before mmnorm is imported')
        else:
            reason += ', other devices the ATen path'
    _REASON[0] = f'mmnorm layers: {reason}'
    _ANNOUNCED[0] = False
    return _REASON[0]


def announce():
    """Log the choice once (called when a layer is built): to mmengine's
    current logger where one exists (a Runner's, built before its model),
    else to Python's ``logging.getLogger('mmnorm')``, which a script that
    configures no logging keeps quiet."""
    if _ANNOUNCED[0]:
        return
    _ANNOUNCED[0] = True
    from mmengine.logging import MMLogger, print_log
    if MMLogger._instance_dict:
        print_log(_REASON[0], logger='current')
    else:
        logging.getLogger('mmnorm').info(_REASON[0])


def mode():
    """The mode chosen by :func:`select`: 'auto', 'aten' or 'triton'."""
    return _MODE[0]


def fused(x):
    """True when the training step on ``x`` runs the fused kernels; raises
    where ``MMNORM_KERNELS=triton`` asked for them and they cannot run."""
    path = _PATHS.get(x.device.type, False)
    if isinstance(path, str):
        raise RuntimeError(path)
    if _FORCED[0] == 'aten' or str(x.device) in FAILED_DEVICES:
        return False
    return path


@contextlib.contextmanager
def aten_only():
    """Every training step in this context takes the ATen path."""
    before, _FORCED[0] = _FORCED[0], 'aten'
    try:
        yield
    finally:
        _FORCED[0] = before


# ---------------------------------------------------------------- launches
class _Launches:
    """Triton kernels launched by this process (read by the benchmark's
    launch count)."""
    count = 0


LAUNCHES = _Launches()


def count_device_kernels(number):
    """Count ``number`` device kernels that a fused operator runs through ATen
    (and so outside the dispatch modes that count operators)."""
    LAUNCHES.count += number


def device_guard(device):
    """The context that makes ``device`` current: Triton launches on the
    current CUDA device, not on the tensors' one."""
    if device.type == 'cuda':
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid, *args, **constants):
    """``kernel[grid](*args, **constants)`` on the device of the first tensor
    argument, counted in ``LAUNCHES``. Torch dispatch modes are suspended
    meanwhile: Triton's interpreter runs the kernel with ATen copies that a
    GPU launch does not make."""
    from torch.utils._python_dispatch import _disable_current_modes
    LAUNCHES.count += 1
    device = next(arg.device for arg in args if isinstance(arg, torch.Tensor))
    with _disable_current_modes(), device_guard(device):
        kernel[grid](*args, **constants)


def kernel_module(name):
    """The Triton kernels of ``name`` (``mmnorm.layers._triton_<name>``),
    imported at first use: Triton reads ``TRITON_INTERPRET`` when the kernels
    are defined."""
    return importlib.import_module(f'{__package__}._triton_{name}')


KERNEL_MODULES = ('shared', 'mabn', 'brn', 'cbn')


def compile_ahead_of_time(archs):
    """Compile every kernel variant of the fused kernels for the NVIDIA compute
    capabilities ``archs`` (e.g. (80, 90)) without a GPU, as Triton would on
    one; raises at the first one that does not compile. Returns one (kernel
    name, arch, cubin bytes) per variant and arch."""
    if os.environ.get('TRITON_INTERPRET') == '1':
        raise RuntimeError('TRITON_INTERPRET=1 defines the kernels for the interpreter, which '
                           'compiles nothing: unset it')
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    compiled = []
    for name in KERNEL_MODULES:
        for kernel, types, constants in kernel_module(name).variants():
            for arch in archs:
                source = ASTSource(fn=kernel, signature=types, constexprs=constants)
                binary = triton.compile(source, target=GPUTarget('cuda', arch, 32))
                compiled.append((kernel.__name__, arch, len(binary.asm['cubin'])))
    return compiled


# ------------------------------------------------- the shared backward
def _normalized_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                         saved: torch.Tensor, bias_dtype: torch.dtype, need_dx: bool,
                         pooled: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) in one Triton kernel (BRN's and CBN's backward)."""
    return kernel_module('shared').normalized_backward(dy, x, weight, saved, bias_dtype, need_dx,
                                                       pooled)


def _normalized_backward_fake(dy, x, weight, saved, bias_dtype, need_dx, pooled):
    return (torch.empty_like(x) if need_dx else x.new_empty(0), torch.empty_like(weight),
            torch.empty_like(weight, dtype=bias_dtype))


_NORMALIZED_BACKWARD = fused_operator('normalized_backward', _normalized_backward,
                                      _normalized_backward_fake, ())


def keep_for_normalized_backward(ctx, inputs, saved, pooled):
    """What :func:`normalized_gradients` needs of a fused forward whose
    inputs start with x, weight, bias and whose ``saved`` is [mean, inv_std,
    r, d] (+ [share] when ``pooled``), see
    :func:`mmnorm.layers._triton_shared.normalized_backward_kernel`."""
    ctx.save_for_backward(inputs[0], inputs[1], saved)
    ctx.bias_dtype, ctx.pooled = inputs[2].dtype, pooled


def normalized_replay(inputs, saved):
    """The output of a fused forward (inputs x, weight, bias, ...) that saved
    ``saved`` = [mean, inv_std, r, d] (+ [share]): weight * (r * (x - mean) *
    inv_std + d) + bias in the statistics dtype, in x's dtype (its replay)."""
    x, weight, bias = inputs[:3]
    mean, inv_std, r, d = saved[:4 * x.size(1)].view(4, -1)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = weight.to(saved.dtype) * r * inv_std
    shift = bias.to(saved.dtype) + weight.to(saved.dtype) * d - mean * scale
    return torch.addcmul(shift.view(shape), x.to(saved.dtype), scale.view(shape)).to(x.dtype)


def normalized_gradients(ctx, dy):
    """The gradients of every input of the fused forward (None but for x,
    weight and bias), one ``mmnorm::normalized_backward`` operator."""
    x, weight, saved = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = _NORMALIZED_BACKWARD(dy, x, weight, saved, ctx.bias_dtype, need[0], ctx.pooled)
    return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * (len(need) - 3)


select()
