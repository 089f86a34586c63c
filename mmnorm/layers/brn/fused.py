"""BRN's fused training step: the glue between the layer
(:mod:`mmnorm.layers.brn.layer`) and its Triton kernels
(:mod:`mmnorm.layers.brn.kernels`, imported at the first fused step: Triton
reads ``TRITON_INTERPRET`` when the kernels are defined). The operator
``mmnorm::brn_fused_forward``, its fake, and :data:`fused_train_step`, whose
backward and replay are the shared ones (:mod:`mmnorm.layers.shared.fused`)."""
import functools
from typing import Tuple

import torch

from ..base import SmallBatchNorm
from ..operators import fused_operator, fused_step
from ..shared.fused import (
    keep_for_normalized_backward,
    normalized_gradients,
    normalized_replay,
)


def _fused_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   running_mean: torch.Tensor, running_var: torch.Tensor, counter: torch.Tensor,
                   flags: torch.Tensor, eps: float, momentum: float, rmax: float, dmax: float,
                   warmup_iters: int, rmax_iters: int,
                   dmax_iters: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The training step's forward in one Triton kernel: (y, [mu_B, 1 /
    sigma_B, r, d]); the running statistics and flags updated."""
    from . import kernels
    return kernels.forward(x, weight, bias, running_mean, running_var, counter, flags, eps,
                           momentum, rmax, dmax, warmup_iters, rmax_iters, dmax_iters,
                           SmallBatchNorm.stats_dtype(x))


def _fused_forward_fake(x, weight, bias, running_mean, running_var, counter, flags, eps, momentum,
                        rmax, dmax, warmup_iters, rmax_iters, dmax_iters):
    return torch.empty_like(x), x.new_empty(4 * x.size(1), dtype=SmallBatchNorm.stats_dtype(x))


fused_train_step = fused_step(
    fused_operator('brn_fused_forward', _fused_forward, _fused_forward_fake,
                   ('running_mean', 'running_var', 'flags')),
    functools.partial(keep_for_normalized_backward, pooled=False), normalized_gradients,
    normalized_replay)
fused_train_step.__doc__ = """BRN's training step on the fused kernels: (the output y of x
(N, C, *), the saved statistics), one ``mmnorm::brn_fused_forward`` operator
(two Triton launches), and its backward, one ``mmnorm::normalized_backward``
(two launches). Arguments: x, weight, bias, running_mean, running_var, the step
counter, step_flags, eps, momentum, rmax, dmax, warmup_iters, rmax_iters,
dmax_iters; ``former=saved`` replays an earlier call."""
