"""The first fused step of each variant on a device, tried before the layer's
state changes (see docs/kernels.md, "First use").

A variant is what makes Triton compile other kernels or take other branches:
the layer's class, the device, the dtypes, the layout, and what the layer adds
(:meth:`~mmnorm.layers.base.SmallBatchNorm.fused_variant`). Before the first
training step of a variant, :func:`takes_fused` runs the fused step (forward
and backward) on a copy of the layer:

* if it raises (no host compiler, an old driver or architecture, a dtype the
  GPU lacks): in ``MMNORM_KERNELS=triton`` the error is raised, before the
  layer's counter or buffers change; in ``auto`` one warning gives the reason
  and the device takes the ATen path for the rest of the process;
* in ``auto``, the copy's results (output, gradients of x, weight and bias,
  every buffer) are compared with the ATen step's on a second copy; a
  difference beyond the fused tests' tolerance warns once, naming the layer,
  the variant and the difference, and the variant takes the ATen path.

Its cost is one extra fused step and, in ``auto``, one ATen step and one read
of the difference on the host, once per variant and process. Nothing is tried
while torch.compile traces.
"""
import warnings

import torch

from .._torch import compiling
from .paths import FAILED_DEVICES, KERNELS_ENV, aten_only, fused, mode

# variant -> None (checked: fused) or why it takes the ATen path
CHECKED = {}
_TRYING = [False]
# rtol = atol (scaled by the largest reference entry) per statistics dtype
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def takes_fused(layer, x, sync):
    """Whether ``layer``'s training step on ``x`` (with ``sync``: the
    statistics of all processes) takes the fused kernels, trying the variant
    first if this process has not (see the module docstring). Raises where
    ``MMNORM_KERNELS=triton`` asked for them and they cannot run."""
    if not layer.FUSED_STEP or (sync and not layer.FUSED_SYNC) or not fused(x):
        return False
    if _TRYING[0] or compiling():
        return True
    key = layer.fused_variant(x)
    if key not in CHECKED:
        CHECKED[key] = _try(layer, x, key)
    return CHECKED[key] is None and fused(x)


def _try(layer, x, key):
    """None if the variant ``key`` may take the fused path, else why not."""
    _TRYING[0] = True
    try:
        try:
            result = _step_on_copy(layer, x)
        except Exception as error:  # noqa: BLE001 -- any failure of a compile or launch
            if mode() == 'triton':
                raise RuntimeError(f'{layer.describe()}: the fused kernels failed on {x.device} '
                                   f'({type(error).__name__}: {error})') from error
            reason = f'{type(error).__name__}: {error}'
            FAILED_DEVICES[str(x.device)] = reason
            warnings.warn(f'mmnorm: the fused Triton kernels failed on {x.device} ({reason}); '
                          f'its layers take the ATen path from now on (set {KERNELS_ENV}=aten '
                          'to choose it and silence this warning)', RuntimeWarning, stacklevel=4)
            return reason
        if mode() != 'auto':
            return None
        with aten_only():
            reference = _step_on_copy(layer, x)
        difference = _difference(result, reference, layer.stats_dtype(x))
        if difference is None:
            return None
        reason = (f'{layer.describe()}: the fused step of variant {key} differs from the ATen '
                  f'step by {difference}')
        warnings.warn(f'mmnorm: {reason}; this variant takes the ATen path from now on (set '
                      f'{KERNELS_ENV}=aten to choose it and silence this warning)',
                      RuntimeWarning, stacklevel=4)
        return reason
    finally:
        _TRYING[0] = False


def _step_on_copy(layer, x):
    """One training step of a copy of ``layer`` on ``x``: {name: tensor} of
    its output, the gradients of x, weight and bias for a fixed incoming
    gradient, and every parameter and buffer afterwards."""
    twin = layer.copy_for_trial()
    out = twin(x)
    result = {'output': out.detach()}
    if out.requires_grad:
        inputs = {name: t for name, t in (('x', x), ('weight', twin.weight),
                                         ('bias', twin.bias)) if t.requires_grad}
        grads = torch.autograd.grad(out, list(inputs.values()),
                                    torch.cos(x.detach()).to(out.dtype))
        result.update((f'grad of {name}', g) for name, g in zip(inputs, grads))
    result.update(twin.named_parameters())
    result.update(twin.named_buffers())
    return result


def _difference(result, reference, dtype):
    """None if every tensor of ``result`` matches ``reference`` within
    TOLERANCE, else a description of the largest difference."""
    tolerance = TOLERANCE[dtype]
    for name, value in result.items():
        expected = reference[name]
        if not value.is_floating_point():
            if not torch.equal(value, expected):
                return f'{name}: not equal'
            continue
        value, expected = value.detach().double(), expected.detach().double()
        scale = max(1.0, float(expected.abs().nan_to_num(0, 0, 0).max())) if expected.numel() else 1
        gap = (value - expected).abs().nan_to_num(0, float('inf'), float('inf'))
        same_nan = value.isnan() == expected.isnan()
        if not bool(same_nan.all()) or bool((gap > tolerance * (scale + expected.abs())).any()):
            return f'{name}: {float(gap.max()):.3g} at most'
    return None
