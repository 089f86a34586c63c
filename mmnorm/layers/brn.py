"""BRN: batch renormalization (Ioffe, "Batch Renormalization", NeurIPS 2017).

Training, per channel c, for x of shape (N, C, *) reduced over every dim but 1:

    mu_B    = mean(x)                     sigma_B = sqrt(var_biased(x) + eps)
    sigma   = sqrt(running_var + eps)
    r       = clip(sigma_B / sigma,            1 / r_max(t), r_max(t))
    d       = clip((mu_B - running_mean) / sigma,  -d_max(t), d_max(t))
    y       = weight * ((x - mu_B) / sigma_B * r + d) + bias

r and d are constants for autograd, so y is BatchNorm with batch statistics
and the affine pair (weight * r, weight * d + bias): the layer runs PyTorch's
fused batch-norm kernel once (x_hat with the batch mean and 1 / sigma_B, from
which r and d follow), applies the affine pair in place, and its backward is
BatchNorm's backward kernel with gamma = weight * r.

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
"""
import torch
from mmengine.registry import MODELS
from torch.autograd.function import once_differentiable

from ._state import SmallBatchNorm, check_number


class RenormalizedBatchNorm(torch.autograd.Function):
    """``y = weight * ((x - mu_B) / sigma_B * r + d) + bias`` for x (N, C, *).

    ``correction(mu_B, sigma_B) -> (r, d)`` is called once in the forward with
    the (C,) batch statistics (float32 or float64, like ``x``), under no_grad:
    r and d are constants for autograd. Backward: BatchNorm's with
    gamma = weight * r, so dweight = r * sum(dy * x_hat) + d * sum(dy) and
    dbias = sum(dy).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, correction, eps):
        x_hat, mean, inv_std = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
        r, d = correction(mean, inv_std.reciprocal())
        gamma = weight * r
        shape = SmallBatchNorm.channel_shape(x)
        y = torch.addcmul((weight * d + bias).view(shape), x_hat, gamma.view(shape), out=x_hat)
        ctx.save_for_backward(x, mean, inv_std, gamma, r, d)
        ctx.eps = eps
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, mean, inv_std, gamma, r, d = ctx.saved_tensors
        dx, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
            dy.contiguous(), x, gamma, None, None, mean, inv_std, True, ctx.eps,
            [ctx.needs_input_grad[0], True, True])
        return dx, dgamma * r + dbeta * d, dbeta, None, None


@MODELS.register_module()
class BRN(SmallBatchNorm):
    """Batch renormalization. Buffers are BatchNorm's (``running_mean``,
    ``running_var``, ``num_batches_tracked``), so a BN checkpoint loads as is.

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
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.01, rmax=3.0, dmax=5.0,
                 warmup_iters=5000, rmax_iters=40000, dmax_iters=25000):
        super().__init__(num_features, eps, momentum)
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

    def _train_forward(self, x):
        self.num_batches_tracked.add_(1)
        dtype = self.stats_dtype(x)
        y = RenormalizedBatchNorm.apply(x.to(dtype), self.weight.to(dtype), self.bias.to(dtype),
                                        self._correct_and_update, self.eps)
        return y.to(x.dtype)

    def _correct_and_update(self, mean_batch, std_batch):
        """(r, d) for this step's batch statistics (C,), then the running
        statistics' update; both on the device, without host synchronisation."""
        std_running = (self.running_var.to(std_batch.dtype) + self.eps).sqrt()
        r_max, d_max = self.clip_bounds(std_batch.dtype)
        r = torch.clamp(std_batch / std_running, 1 / r_max, r_max)
        d = torch.clamp((mean_batch - self.running_mean) / std_running, -d_max, d_max)

        finite = torch.isfinite(mean_batch) & torch.isfinite(std_batch)
        self.warn_if_nonfinite(finite)
        new_std = std_running + self.momentum * (std_batch - std_running)
        new_mean = self.running_mean + self.momentum * (mean_batch - self.running_mean)
        self.update_where_finite(self.running_mean, new_mean, finite)
        self.update_where_finite(self.running_var, new_std.square() - self.eps, finite)
        return r, d

    def extra_repr(self):
        return (f'{self.num_features}, eps={self.eps}, momentum={self.momentum}, '
                f'rmax={self.rmax}, dmax={self.dmax}, warmup_iters={self.warmup_iters}, '
                f'rmax_iters={self.rmax_iters}, dmax_iters={self.dmax_iters}')
