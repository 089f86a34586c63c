"""CBN's fused training step: the glue between the layer
(:mod:`mmnorm.layers.cbn.layer`) and its Triton kernels
(:mod:`mmnorm.layers.cbn.kernels`, imported at the first fused step: Triton
reads ``TRITON_INTERPRET`` when the kernels are defined). The operator
``mmnorm::cbn_fused_forward``, its fake, and :data:`fused_train_step`, whose
backward and replay are the shared ones (:mod:`mmnorm.layers.shared.fused`);
``_HISTORY``, the names of the ring buffers, which the operator writes."""
import functools
from typing import List, Optional, Tuple

import torch

from ..base import SmallBatchNorm
from ..conv_statistics import ConvCall
from ..operators import fused_operator, fused_step
from ..shared.fused import (
    keep_for_normalized_backward,
    normalized_gradients,
    normalized_replay,
)

_HISTORY = ('history_mean', 'history_sqmean', 'history_valid', 'history_dmean',
            'history_dsqmean', 'history_weight')


def _fused_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   running_mean: torch.Tensor, running_var: torch.Tensor, pushes: torch.Tensor,
                   flags: torch.Tensor, history_mean: torch.Tensor, history_sqmean: torch.Tensor,
                   history_valid: torch.Tensor, history_dmean: torch.Tensor,
                   history_dsqmean: torch.Tensor, history_weight: torch.Tensor,
                   theta: Optional[torch.Tensor], conv_input: Optional[torch.Tensor],
                   square_sum: Optional[torch.Tensor], call: Optional[List[int]], groups: int,
                   window: int, eps: float, momentum: float, rho: float, pool: bool,
                   push: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The training step's forward: the patch sums (when compensating) and
    three launches for the rest; (y, what the backward needs)."""
    from . import kernels as triton_cbn
    dtype = SmallBatchNorm.stats_dtype(x)
    patch = None
    if theta is not None:
        conv = ConvCall(tuple(call[0:2]), tuple(call[2:4]), tuple(call[4:6]), groups,
                        tuple(call[6:8]))
        patch = triton_cbn.patch_sums(conv, conv_input, dtype)
        theta, square_sum = theta.view(theta.size(0), -1), square_sum.view(theta.size(0), -1)
    ring = (history_mean, history_sqmean, history_valid, history_dmean, history_dsqmean,
            history_weight)
    return triton_cbn.forward(x, weight, bias, running_mean, running_var, pushes, flags,
                              ring, theta, patch, square_sum, groups, window, eps, momentum,
                              rho, pool, push, dtype)


def _fused_forward_fake(x, weight, bias, *rest):
    return torch.empty_like(x), x.new_empty(5 * x.size(1), dtype=SmallBatchNorm.stats_dtype(x))


fused_train_step = fused_step(
    fused_operator('cbn_fused_forward', _fused_forward, _fused_forward_fake,
                   ('running_mean', 'running_var', 'pushes', 'flags') + _HISTORY),
    functools.partial(keep_for_normalized_backward, pooled=True), normalized_gradients,
    normalized_replay)
fused_train_step.__doc__ = """CBN's training step on the fused kernels: (the output y of x
(N, C, H, W), the saved statistics), one ``mmnorm::cbn_fused_forward`` operator
(three Triton launches, and the patch sums' convolution when it compensates),
and its backward, one ``mmnorm::normalized_backward`` (two launches). The
conv's weight gradient for grad_output = x (``square_sum``) comes in from one
ATen ``convolution_backward``. Arguments: x, weight, bias, the running
statistics, the push counter, step_flags, the six ring buffers, theta (C,
C_in/groups, kh, kw, contiguous), the conv's input and square_sum (or None
without compensation), the conv's stride, padding, dilation and kernel size (8
ints), groups, the window (how many of the newest stored steps may be pooled),
eps, momentum, rho, pool, push; ``former=saved`` replays an earlier call."""
