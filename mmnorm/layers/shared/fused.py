"""The fused backward that BRN and CBN share: a fused forward that saved
[mean, inv_std, r, d] (+ [share] when pooled) gets its gradients from one
``mmnorm::normalized_backward`` operator (two Triton launches of
:mod:`mmnorm.layers.shared.kernels`), and its replay from the saved
statistics."""
from typing import Tuple

import torch

from ..operators import fused_operator


def _normalized_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                         saved: torch.Tensor, bias_dtype: torch.dtype, need_dx: bool,
                         pooled: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) in one Triton kernel (BRN's and CBN's backward)."""
    from . import kernels
    return kernels.normalized_backward(dy, x, weight, saved, bias_dtype, need_dx, pooled)


def _normalized_backward_fake(dy, x, weight, saved, bias_dtype, need_dx, pooled):
    return (torch.empty_like(x) if need_dx else x.new_empty(0), torch.empty_like(weight),
            torch.empty_like(weight, dtype=bias_dtype))


_NORMALIZED_BACKWARD = fused_operator('normalized_backward', _normalized_backward,
                                      _normalized_backward_fake, ())


def keep_for_normalized_backward(ctx, inputs, saved, pooled):
    """What :func:`normalized_gradients` needs of a fused forward whose
    inputs start with x, weight, bias and whose ``saved`` is [mean, inv_std,
    r, d] (+ [share] when ``pooled``), see
    :func:`mmnorm.layers.shared.kernels.normalized_backward_kernel`."""
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
