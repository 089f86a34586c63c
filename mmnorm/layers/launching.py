"""How the fused kernels are launched: :func:`launch` runs a Triton kernel on
its tensors' device and counts it in ``LAUNCHES`` (with the device kernels a
fused operator runs through ATen, :func:`count_device_kernels`). Every
method's kernels module launches through here (see :mod:`mmnorm.layers.paths`
for when the fused kernels run at all)."""
import contextlib

import torch


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
