"""BRN: batch renormalization (Ioffe, "Batch Renormalization", NeurIPS 2017).

Training, per channel c, for x of shape (N, C, *) reduced over every dim but 1:

    mu_B    = mean(x)                     sigma_B = sqrt(var_biased(x) + eps)
    sigma   = sqrt(running_var + eps)
    r       = clip(sigma_B / sigma,            1 / r_max(t), r_max(t))
    d       = clip((mu_B - running_mean) / sigma,  -d_max(t), d_max(t))
    y       = weight * ((x - mu_B) / sigma_B * r + d) + bias

r and d are constants for autograd, so y is BatchNorm with batch statistics
and the affine pair (weight * r, weight * d + bias); the layer computes it with
PyTorch's fused batch-norm kernel and gets BN's backward for free.

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

from ._state import SmallBatchNorm, check_number


def renormalized_batch_norm(x, weight, bias, r, d, eps):
    """``weight * ((x - mu_B) / sigma_B * r + d) + bias`` with batch statistics
    of ``x`` (N, C, *), where r, d, weight, bias have shape (C,) and r, d are
    treated as constants. One fused batch-norm call."""
    return torch.batch_norm(x, weight * r, weight * d + bias, None, None, True, 0.0, eps,
                            torch.backends.cudnn.enabled)


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
        with torch.no_grad():
            var_batch, mean_batch = torch.var_mean(x.to(dtype), dim=self.reduce_dims(x),
                                                   correction=0)
            std_batch = (var_batch + self.eps).sqrt()
            std_running = (self.running_var.to(dtype) + self.eps).sqrt()
            r_max, d_max = self.clip_bounds(dtype)
            r = torch.clamp(std_batch / std_running, 1 / r_max, r_max)
            d = torch.clamp((mean_batch - self.running_mean.to(dtype)) / std_running, -d_max, d_max)

            finite = torch.isfinite(mean_batch) & torch.isfinite(std_batch)
            self.warn_if_nonfinite(finite)
            new_std = std_running + self.momentum * (std_batch - std_running)
            new_mean = self.running_mean + self.momentum * (mean_batch - self.running_mean)
            self.update_where_finite(self.running_mean, new_mean, finite)
            self.update_where_finite(self.running_var, new_std.square() - self.eps, finite)
        weight, bias = self.weight.to(dtype), self.bias.to(dtype)
        y = renormalized_batch_norm(x, weight, bias, r, d, self.eps)
        return y

    def extra_repr(self):
        return (f'{self.num_features}, eps={self.eps}, momentum={self.momentum}, '
                f'rmax={self.rmax}, dmax={self.dmax}, warmup_iters={self.warmup_iters}, '
                f'rmax_iters={self.rmax_iters}, dmax_iters={self.dmax_iters}')
