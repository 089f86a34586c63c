"""BRN: batch renormalization (Ioffe, "Batch Renormalization", NeurIPS 2017).

Training, per channel c, for x of shape (N, C, *) reduced over every dim but 1:

    mu_B    = mean(x)                     sigma_B = sqrt(var_biased(x) + eps)
    sigma   = sqrt(running_var + eps)
    r       = clip(sigma_B / sigma,            1 / r_max(t), r_max(t))
    d       = clip((mu_B - running_mean) / sigma,  -d_max(t), d_max(t))
    y       = weight * ((x - mu_B) / sigma_B * r + d) + bias

r and d are constants for autograd, so y is BatchNorm with batch statistics
and the affine pair (weight * r, weight * d + bias): the layer computes the
batch statistics with PyTorch's batch-norm kernels (r and d follow from them),
the output in one more pass, and its backward is BatchNorm's backward kernel
with gamma = weight * r.

After the output, the running statistics move towards the batch (the paper's
algorithm: the running *standard deviation*, not the variance, is averaged):

    running_mean <- running_mean + momentum * (mu_B - running_mean)
    sigma        <- sigma + momentum * (sigma_B - sigma)
    running_var  <- sigma^2 - eps        (so BN checkpoints and BN inference agree)

Schedule of the clipping bounds, t = num_batches_tracked (1 at the first step):
r_max(t) = 1 and d_max(t) = 0 while t <= warmup_iters (the layer is BN with
batch statistics), then both grow linearly to ``rmax`` at ``rmax_iters`` and
``dmax`` at ``dmax_iters``. Inference is BatchNorm with the running statistics.
The bounds are computed on the device from the step-counter buffer: no
host synchronisation per step.

Processes (DDP): by default, as in the paper, each process keeps its own
statistics: the buffers differ between ranks and a checkpoint (written by rank
0) holds rank 0's. With ``sync_stats=True`` in a multi-process run, mu_B and
sigma_B are those of the union of all processes' inputs, SyncBatchNorm-style
(:func:`mmnorm.layers.distributed.union_moments`: one all-gather of 2C + 1 numbers
per process in the forward, one all-reduce of 2C in the backward), so every
process holds the same buffers; see :class:`BRN`.
"""
from typing import Tuple

import torch
from mmengine.registry import MODELS

from ..._torch import native_batch_norm_backward, without_autocast
from ..base import SmallBatchNorm, check_number
from ..distributed import union_moments
from ..operators import Operator, with_backward
from .fused import fused_train_step


def batch_statistics(x, eps):
    """(mean, 1 / sqrt(var + eps)) of x (N, C, *) per channel, var biased, from
    PyTorch's batch-norm training kernel (its normalised output is dropped; on
    the CPU ``var_mean`` takes 3x as long)."""
    _, mean, inv_std = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
    return mean, inv_std


def _output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
            inv_std: torch.Tensor, r: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift``: one pass with per-channel coefficients."""
    scale = weight * r * inv_std
    shift = weight * d + bias - mean * scale
    shape = SmallBatchNorm.channel_shape(x)
    return torch.addcmul(shift.view(shape), x, scale.view(shape))


def _backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
              inv_std: torch.Tensor, r: torch.Tensor, d: torch.Tensor,
              need_dx: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); dx is empty unless ``need_dx``."""
    dx, dgamma, dbeta = native_batch_norm_backward(
        dy, x, weight * r, None, None, mean, inv_std, True, 0.0, [need_dx, True, True])
    return dx if need_dx else x.new_empty(0), dgamma * r + dbeta * d, dbeta


def _fake_backward(dy, x, weight, mean, inv_std, r, d, need_dx):
    return (torch.empty_like(x) if need_dx else x.new_empty(0), torch.empty_like(weight),
            torch.empty_like(weight))


_OUTPUT = Operator('brn_train_output', _output,
                   lambda x, weight, bias, mean, inv_std, r, d: torch.empty_like(x))
_BACKWARD = Operator('brn_train_backward', _backward, _fake_backward)


def _keep_for_backward(ctx, inputs, output):
    x, weight, _, mean, inv_std, r, d = inputs
    ctx.save_for_backward(x, weight, mean, inv_std, r, d)


renormalized_batch_norm = with_backward(_OUTPUT, _keep_for_backward, _BACKWARD,
                                        lambda ctx, dy, need_dx: (dy, *ctx.saved_tensors,
                                                                  need_dx))
renormalized_batch_norm.__doc__ = """``y = weight * ((x - mu_B) / sigma_B * r + d) + bias`` for
x (N, C, *), one autograd node (one operator under torch.compile).

Arguments (positional): x, weight, bias, then ``mean`` = mu_B and ``inv_std`` =
1 / sigma_B, x's batch statistics (C,) computed by the caller without autograd
(the gradient still flows through them into x, as in BatchNorm), and r, d (C,),
constants for autograd. Backward: BatchNorm's kernel with gamma = weight * r,
so dweight = r * sum(dy * x_hat) + d * sum(dy) and dbias = sum(dy).
"""


@MODELS.register_module()
class BRN(SmallBatchNorm):
    """Batch renormalization. Buffers are BatchNorm's (``running_mean``,
    ``running_var``, ``num_batches_tracked``), so a BN checkpoint loads as is;
    the running statistics stay float32 when the module is cast to float16 or
    bfloat16, and half inputs get float32 statistics.

    Args:
        num_features (int): C, the number of channels on dim 1.
        eps (float): added to the variance under the root. Default 1e-5.
        momentum (float): weight of the NEW batch value in the running averages
            (PyTorch BN's convention). Default 0.01.
        rmax (float): final bound of r, >= 1. Default 3.0.
        dmax (float): final bound of |d|, >= 0. Default 5.0.
        warmup_iters (int): steps with r = 1, d = 0 (plain BN). Default 5000.
        rmax_iters (int): step at which r's bound reaches ``rmax``. Default 40000.
        dmax_iters (int): step at which d's bound reaches ``dmax``. Default 25000.
        sync_stats (bool): use the batch statistics of all processes' inputs.
            Default False: each process keeps its own, as in the paper.

    With ``sync_stats=True``, when torch.distributed is initialised with more
    than one process (otherwise the key changes nothing), mu_B and sigma_B
    are the mean and standard deviation of the union of all processes'
    inputs (weighted by element counts), with gradients flowing to every
    process's input as in SyncBatchNorm; r, d and the running statistics
    follow from them, identically on every process. This path uses autograd
    on elementwise ops instead of the fused kernel. Every process must call
    the layer as often as the others and backpropagate through every call
    (the backward is a collective); an empty input takes part with a count of
    0 and advances t like the others; if the union is empty, t advances and
    the running statistics keep their values.
    """

    FUSED_STEP = True

    def __init__(self, num_features, eps=1e-5, momentum=0.01, rmax=3.0, dmax=5.0,
                 warmup_iters=5000, rmax_iters=40000, dmax_iters=25000, sync_stats=False):
        super().__init__(num_features, eps, momentum, sync_stats)
        name = type(self).__name__
        self.rmax = check_number(name, 'rmax', rmax, minimum=1, exclusive=False)
        self.dmax = check_number(name, 'dmax', dmax, minimum=0, exclusive=False)
        self.warmup_iters = check_number(name, 'warmup_iters', warmup_iters, integer=True,
                                         minimum=0, exclusive=False)
        self.rmax_iters = check_number(name, 'rmax_iters', rmax_iters, integer=True,
                                       minimum=warmup_iters)
        self.dmax_iters = check_number(name, 'dmax_iters', dmax_iters, integer=True,
                                       minimum=warmup_iters)

    def clip_bounds(self, dtype):
        """(r_max(t), d_max(t)) as 0-dim tensors on the layer's device, for the
        current step t."""
        t = self.num_batches_tracked.to(dtype)
        r_ramp = ((t - self.warmup_iters) / (self.rmax_iters - self.warmup_iters)).clamp(0, 1)
        d_ramp = ((t - self.warmup_iters) / (self.dmax_iters - self.warmup_iters)).clamp(0, 1)
        return 1 + (self.rmax - 1) * r_ramp, self.dmax * d_ramp

    def _train_forward(self, x, sync):
        if self._fused_now:
            y, saved = self._fused_call(x)
            self._keep_for_replay(x, ('fused', saved))
            return y
        dtype = self.stats_dtype(x)
        with without_autocast(x.device.type):
            if sync:
                return self._union_forward(x.to(dtype), keep=x).to(x.dtype)
            xs = x.to(dtype)
            with torch.no_grad():
                mean, inv_std = batch_statistics(xs, self.eps)
                r, d = self._correct_and_update(mean, inv_std.reciprocal())
            self._keep_for_replay(x, ('aten', mean, inv_std, r, d))
            return self._aten_output(xs, mean, inv_std, r, d).to(x.dtype)

    def _aten_output(self, xs, mean, inv_std, r, d):
        dtype = xs.dtype
        return renormalized_batch_norm(xs, self.weight.to(dtype), self.bias.to(dtype), mean,
                                       inv_std, r, d)

    def _fused_call(self, x, former=None):
        return fused_train_step(x, self.weight, self.bias, self.running_mean, self.running_var,
                                self.num_batches_tracked, self.step_flags, self.eps,
                                self.momentum, self.rmax, self.dmax, self.warmup_iters,
                                self.rmax_iters, self.dmax_iters, former=former)

    def _replay(self, x, record):
        if record[0] == 'fused':
            return self._fused_call(x, former=record[1])[0]
        dtype = self.stats_dtype(x)
        with without_autocast(x.device.type):
            if record[0] == 'sync':
                return self._union_forward(x.to(dtype), former=record[1:]).to(x.dtype)
            return self._aten_output(x.to(dtype), *record[1:]).to(x.dtype)

    def _union_forward(self, x, keep=None, former=None):
        """The training step with mu_B, sigma_B of all processes' inputs; x is
        in the statistics dtype. Same equations as :data:`renormalized_batch_norm`,
        written with autograd ops: r and d are constants, the gradient flows
        through mu_B and sigma_B into every process's input. ``keep``: the
        layer's input, under which the step is kept for its replay; ``former``:
        a kept step's (moments, r, d), replayed without all-gathering again."""
        if former is None:
            mean, var, total = union_moments(x)
            with torch.no_grad():
                r, d = self._correct_and_update(mean, (var + self.eps).sqrt(), total > 0)
            self._keep_for_replay(keep, ('sync', (mean.detach(), var.detach(), total), r, d))
        else:
            moments, r, d = former
            mean, var, _ = union_moments(x, former=moments)
        std = (var + self.eps).sqrt()
        shape = self.channel_shape(x)
        weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
        scale = (weight * r / std).view(shape)
        return (x - mean.view(shape)) * scale + (weight * d + bias).view(shape)

    def _correct_and_update(self, mean_batch, std_batch, present=None):
        """(r, d) for this step's batch statistics (C,), then the running
        statistics' update; both on the device, without host synchronisation.
        ``present`` (0-dim bool, sync_stats only): False when the union of the
        processes' inputs is empty, and then nothing is updated."""
        std_running = (self.running_var.to(std_batch.dtype) + self.eps).sqrt()
        r_max, d_max = self.clip_bounds(std_batch.dtype)
        r = torch.clamp(std_batch / std_running, 1 / r_max, r_max)
        d = torch.clamp((mean_batch - self.running_mean) / std_running, -d_max, d_max)

        finite = torch.isfinite(mean_batch) & torch.isfinite(std_batch)
        finite = self.warn_if_nonfinite(finite)
        if present is not None:
            finite = finite & present
        new_std = std_running + self.momentum * (std_batch - std_running)
        new_mean = self.running_mean + self.momentum * (mean_batch - self.running_mean)
        self.update_where_finite(self.running_mean, new_mean, finite)
        self.update_where_finite(self.running_var, new_std.square() - self.eps, finite)
        return r, d

