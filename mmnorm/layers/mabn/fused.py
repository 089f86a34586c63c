"""MABN's fused training step: the glue between the layer
(:mod:`mmnorm.layers.mabn.layer`) and its Triton kernels
(:mod:`mmnorm.layers.mabn.kernels`, imported at the first fused step: Triton
reads ``TRITON_INTERPRET`` when the kernels are defined). The operators
``mmnorm::mabn_fused_forward`` and ``mmnorm::mabn_fused_backward``, their
fakes, and :data:`fused_train_step`; :func:`_train_output` is the output of a
step from its statistics, which the ATen step and the fused step's replay
share."""
from typing import Tuple

import torch

from ..._torch import without_autocast
from ..base import SmallBatchNorm
from ..operators import fused_operator, fused_step


def _train_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  inv_std: torch.Tensor, r: torch.Tensor, buffer_gz: torch.Tensor,
                  row: torch.Tensor, early: torch.Tensor, out_dtype: torch.dtype,
                  flags: torch.Tensor, sync: bool) -> torch.Tensor:
    """The training step's output ``y = x * (weight * r * inv_std) + bias``, one
    fused pass; the other arguments are for
    :func:`mmnorm.layers.mabn.layer._train_backward`."""
    cdtype = inv_std.dtype
    shape = SmallBatchNorm.channel_shape(x)
    with without_autocast(x.device.type):
        scale = weight.to(cdtype) * r * inv_std
        y = torch.addcmul(bias.to(cdtype).view(shape), x.to(cdtype), scale.view(shape))
    return y.to(out_dtype)


def _fused_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   running_var: torch.Tensor, buffer_x2: torch.Tensor, buffer_gz: torch.Tensor,
                   counter: torch.Tensor, flags: torch.Tensor, eps: float, momentum: float,
                   warmup_iters: int, renorm_after: int, rmax: float, out_dtype: torch.dtype,
                   sync: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The training step's forward in one Triton kernel: (y, what the backward
    needs); ``buffer_gz`` only passes through to the backward."""
    from . import kernels
    return kernels.forward(x, weight, bias, running_var, buffer_x2, counter, flags, eps, momentum,
                           warmup_iters, renorm_after, rmax, out_dtype,
                           SmallBatchNorm.stats_dtype(x), sync)


def _fused_forward_fake(x, weight, bias, running_var, buffer_x2, buffer_gz, counter, flags, eps,
                        momentum, warmup_iters, renorm_after, rmax, out_dtype, sync):
    channels = x.size(1)
    return (torch.empty_like(x, dtype=out_dtype),
            x.new_empty(2 * channels + 2, dtype=SmallBatchNorm.stats_dtype(x)))


def _fused_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, saved: torch.Tensor,
                    buffer_gz: torch.Tensor, flags: torch.Tensor, bias_dtype: torch.dtype,
                    sync: bool, need_dx: bool
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) in one Triton kernel, writing psi_t into ``buffer_gz``."""
    from . import kernels
    return kernels.backward(dy, x, weight, saved, buffer_gz, flags, bias_dtype, sync, need_dx)


def _fused_backward_fake(dy, x, weight, saved, buffer_gz, flags, bias_dtype, sync, need_dx):
    return (torch.empty_like(x) if need_dx else x.new_empty(0), torch.empty_like(weight),
            torch.empty_like(weight, dtype=bias_dtype))


def _keep_for_fused_backward(ctx, inputs, saved):
    x, weight, bias, _, _, buffer_gz, _, flags = inputs[:8]
    ctx.save_for_backward(x, weight, saved)
    # not saved: other calls' backwards write them first
    ctx.buffer_gz, ctx.flags, ctx.sync, ctx.bias_dtype = buffer_gz, flags, inputs[-1], bias.dtype


def _fused_gradients(ctx, dy):
    x, weight, saved = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = _FUSED_BACKWARD(dy, x, weight, saved, ctx.buffer_gz, ctx.flags, ctx.bias_dtype,
                            ctx.sync, need[0])
    return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * (len(need) - 3)


def _fused_replay(inputs, saved):
    """The output of the fused forward that saved ``saved`` (its replay)."""
    x, weight, bias = inputs[:3]
    channels = x.size(1)
    return _train_output(x, weight, bias, saved[:channels], saved[channels:2 * channels], None,
                         None, None, inputs[13], None, False)


_FUSED_BACKWARD = fused_operator('mabn_fused_backward', _fused_backward, _fused_backward_fake,
                                 ('buffer_gz', 'flags'))
fused_train_step = fused_step(
    fused_operator('mabn_fused_forward', _fused_forward, _fused_forward_fake,
                   ('running_var', 'buffer_x2', 'flags')),
    _keep_for_fused_backward, _fused_gradients, _fused_replay)
fused_train_step.__doc__ = """MABN's training step on the fused kernels: (the output y of
``x`` (N, C, *), the saved statistics), one ``mmnorm::mabn_fused_forward`` operator
(two Triton launches, an all-reduce between them with ``sync``), and its
backward, one ``mmnorm::mabn_fused_backward`` (the same). Arguments: x, weight,
bias, running_var, buffer_x2, buffer_gz, the step counter, step_flags, eps,
momentum, warmup_iters, renorm_after, rmax, the output dtype, sync;
``former=saved`` replays an earlier call."""
