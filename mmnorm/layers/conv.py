"""Convolutions whose weight is re-parametrised before every use.

The weight has shape (C_out, C_in / groups, kh, kw). Both layers change each
output filter W[o] (one slice of C_in / groups * kh * kw numbers) before the
convolution; the raw weight is the parameter, and it is what the state dict
stores, under the same keys as ``nn.Conv2d``.

CenConv, weight centralisation (Yan et al., ICLR 2020, "Towards Stabilizing
Batch Statistics in Backward Propagation of Batch Normalization", the conv
placed in front of every MABN)::

    W_hat[o] = W[o] - mean(W[o])

WSConv, weight standardisation (Qiao et al., 2019, "Weight Standardization")::

    W_hat[o] = (W[o] - mean(W[o])) / (std(W[o]) + eps),   eps = 1e-5

std is the unbiased standard deviation, with eps outside the root, as in the
original code. For a filter with zero variance the gradient of the root is
infinite and the weight gradient NaN (torch.std itself guards this only since
PyTorch 1.7). Here the variance is clamped from below at the smallest normal
float before the root: that adds 1.1e-19 at most to std, nothing next to eps,
and the gradient is finite. A filter with a single element (C_in / groups =
kh = kw = 1) has no unbiased variance; it is centred to zero all the same, so
its variance is taken as 0 and W_hat[o] = 0: such a layer outputs its bias.
The statistics are computed in at least float32 (float64 stays float64).

Evaluation cache: when the module is in eval mode and no gradient is needed
for the weight (grad mode off, or the weight does not require grad), W_hat is
computed once and reused. The cache is a plain attribute, not in the state
dict; it is keyed on the weight's storage address, version counter, device and
dtype (and on inference mode), so load_state_dict, .to() and in-place edits
invalidate it. train() / eval() and .to() drop it; copies and pickles leave it
behind.
"""
import math

import torch
from mmengine.registry import MODELS

from .base import TransformedWeightConv, check_number


class _Centre(torch.autograd.Function):
    """W[o] - mean(W[o]) for every output filter o. Centring is a symmetric
    projection, so its backward applies the same map to the incoming
    gradient: two operations each way (autograd's own backward of the mean
    and the subtraction takes five)."""

    @staticmethod
    def forward(ctx, weight):
        return weight - weight.mean(dim=(1, 2, 3), keepdim=True)

    @staticmethod
    def backward(ctx, grad):
        return grad - grad.mean(dim=(1, 2, 3), keepdim=True)


@MODELS.register_module('CenConv')
class CenConv(TransformedWeightConv):
    """Conv2d with each output filter centred to zero mean (no scaling)."""

    def transform_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return _Centre.apply(weight)


@MODELS.register_module('WSConv')
class WSConv(TransformedWeightConv):
    """Conv2d with each output filter standardised; nn.Conv2d's arguments + eps."""

    OPTIONS = ('eps',)

    def __init__(self, *args, eps: float = 1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = check_number(type(self).__name__, 'eps', eps, minimum=0)

    def transform_weight(self, weight: torch.Tensor) -> torch.Tensor:
        stats_dtype = torch.promote_types(weight.dtype, torch.float32)
        filter_weight = weight.to(stats_dtype)
        filter_size = math.prod(weight.shape[1:])
        correction = 1 if filter_size > 1 else 0  # one element: variance 0
        var, mean = torch.var_mean(
            filter_weight, dim=(1, 2, 3), correction=correction, keepdim=True)
        std = var.clamp_min(torch.finfo(stats_dtype).tiny).sqrt()
        return ((filter_weight - mean) / (std + self.eps)).to(weight.dtype)

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, eps={self.eps}'
