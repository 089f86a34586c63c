"""Every call mmnorm makes into torch's private or version-dependent API.

The rest of the package calls these names instead of reaching into torch, so
that a torch release that changes one of them changes one file. Each entry
says where it was checked: "CI" is torch 2.1.2 and 2.13.0 on the CPU; "GPU"
is torch 2.11 with CUDA 13 on an H200 (tools/gpu_check.sh). The oldest
supported torch is :data:`mmnorm.compat.MINIMUM_TORCH`.
"""
import contextlib
import importlib
import sys

import torch
import torch.utils.checkpoint

from .compat import torch_version

# ------------------------------------------------------------------ autocast
_CAST_BY_AUTOCAST = (torch.float16, torch.bfloat16, torch.float32)


def autocast_state(device_type):
    """(enabled, dtype) of autocast on ``device_type``, (False, None) where it
    has none. torch >= 2.4 answers for every device type; 2.0-2.3 has
    per-device functions (the CPU's and CUDA's). Checked: CI, GPU."""
    if hasattr(torch.amp, 'is_autocast_available'):
        # The CPU and CUDA always have autocast; asking is a graph break under
        # torch.compile in torch 2.11 (measured on the GPU check).
        if device_type not in ('cpu', 'cuda') and not torch.amp.is_autocast_available(device_type):
            return False, None
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    if device_type == 'cpu':
        return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    if device_type == 'cuda':
        return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    return False, None


def without_autocast(device_type):
    """A context that turns autocast off on ``device_type`` (if it has one):
    how every layer runs its statistics, in the dtypes it chooses, whatever
    autocast's lists say. Checked: CI, GPU."""
    if autocast_state(device_type)[1] is not None:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_output_dtype(x):
    """The dtype autocast gives an op's output for input ``x``: its dtype when
    autocast is on for ``x``'s device and would cast ``x`` (float64 never is),
    otherwise ``x``'s own."""
    enabled, dtype = autocast_state(x.device.type)
    return dtype if enabled and x.dtype in _CAST_BY_AUTOCAST else x.dtype


def any_autocast_enabled():
    """Whether autocast is on for any device: ``torch._C`` (private), one call
    where the public functions take one per device. Checked: CI, GPU."""
    return torch._C._is_any_autocast_enabled()


# ------------------------------------------------------------- ATen kernels
# Called as operators (their schemas are stable since torch 1.x; the Python
# functions that wrap them do more than mmnorm wants). Checked: CI, GPU.
native_batch_norm = torch.ops.aten.native_batch_norm
native_batch_norm_backward = torch.ops.aten.native_batch_norm_backward
convolution_backward = torch.ops.aten.convolution_backward


# ------------------------------------------------------------ autograd graph
def saved_convolution(node):
    """What the autograd node ``node`` of a convolution (``ConvolutionBackward0``)
    saved: (input, weight, stride, padding, dilation, groups, transposed), or
    None where the node is another one. The ``_saved_*`` fields are private;
    reading a saved tensor that was changed in place raises RuntimeError.
    Checked: CI, GPU."""
    if not type(node).__name__.startswith('ConvolutionBackward'):
        return None
    return (node._saved_input, node._saved_weight, tuple(node._saved_stride),
            tuple(node._saved_padding), tuple(node._saved_dilation), node._saved_groups,
            node._saved_transposed)


def in_reentrant_checkpoint():
    """True while the first forward of reentrant activation checkpointing runs
    (``torch.utils.checkpoint`` with ``use_reentrant=True``, MMDetection's and
    mmcv's ``with_cp``): its private ``CheckpointFunction.forward`` is on the
    Python stack. That forward runs under no_grad, and the same forward runs
    again with gradients in the backward. Checked: CI (2.1, 2.13)."""
    code = torch.utils.checkpoint.CheckpointFunction.forward.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def version(tensor):
    """The tensor's version counter (private ``_version``): bumped by every
    in-place change, ``load_state_dict`` included. Checked: CI, GPU."""
    return tensor._version


# ------------------------------------------------------------------ compile
#: ``torch.library.custom_op`` (torch >= 2.4). Checked: CI (2.13 has it, 2.1 not), GPU.
CUSTOM_OPS = hasattr(torch.library, 'custom_op') and hasattr(torch, 'compiler')


def compiling():
    """True while torch.compile traces the caller (never on torch < 2.3, which
    has no ``torch.compiler.is_compiling``). Checked: CI, GPU."""
    is_compiling = getattr(getattr(torch, 'compiler', None), 'is_compiling', None)
    return is_compiling is not None and is_compiling()


def compile_disabled(function):
    """``function`` run outside torch.compile's graphs: ``torch.compiler.disable``
    (torch >= 2.1), ``torch._dynamo.disable`` on 2.0. Checked: CI, GPU."""
    compiler = getattr(torch, 'compiler', None)
    if compiler is not None and hasattr(compiler, 'disable'):
        return compiler.disable(function)
    return importlib.import_module('torch._dynamo').disable(function)


# ------------------------------------------------------------ serialization
#: Whether ``torch.serialization.safe_globals`` can allow a class for one
#: weights-only load (torch >= 2.5). Checked: CI (2.13 can, 2.1 cannot).
CAN_ALLOW_CLASSES = hasattr(torch.serialization, 'safe_globals')


def load_mapped(path):
    """``torch.load(path)`` of a trusted file, its tensors memory-mapped
    (torch >= 2.1; torch 2.0 reads the file into memory). Checked: CI."""
    mapped = dict(mmap=True) if torch_version() >= (2, 1) else {}
    return torch.load(path, map_location='cpu', weights_only=False, **mapped)
