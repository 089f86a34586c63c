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
from torch import nn

from .._torch import version
from ._state import check_number, script_refusal


class _TransformedWeightConv(nn.Conv2d):
    """nn.Conv2d that convolves with ``transform_weight(self.weight)``.

    Subclasses implement ``transform_weight``; the constructor is nn.Conv2d's.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._eval_weight_cache = None

    def transform_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Map the raw weight (C_out, C_in / groups, kh, kw) to the used one."""
        raise NotImplementedError

    def transformed_weight(self) -> torch.Tensor:
        """The weight the convolution uses (cached in eval mode, see module doc)."""
        weight = self.weight
        if self.training or (torch.is_grad_enabled() and weight.requires_grad):
            return self.transform_weight(weight)
        key = (weight.data_ptr(), version(weight), weight.device, weight.dtype,
               torch.is_inference_mode_enabled())
        cache = self._eval_weight_cache
        if cache is None or cache[0] != key:
            with torch.no_grad():
                # The detached raw weight keeps its storage alive, so a new
                # weight cannot reuse the address that the key holds.
                cache = (key, weight.detach(), self.transform_weight(weight))
            self._eval_weight_cache = cache
        return cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) or (C_in, H, W) -> the convolution with the
        transformed weight. torch's error for a bad input (wrong channel
        count or rank) is re-raised with this layer's name in front."""
        try:
            return self._conv_forward(x, self.transformed_weight(), self.bias)
        except RuntimeError as error:
            raise RuntimeError(f'{type(self).__name__}: {error}') from error

    def __prepare_scriptable__(self):
        raise RuntimeError(script_refusal(self))

    def train(self, mode: bool = True):
        self._eval_weight_cache = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._eval_weight_cache = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        state['_eval_weight_cache'] = None
        return state


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
class CenConv(_TransformedWeightConv):
    """Conv2d with each output filter centred to zero mean (no scaling)."""

    def transform_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return _Centre.apply(weight)


@MODELS.register_module('WSConv')
class WSConv(_TransformedWeightConv):
    """Conv2d with each output filter standardised; nn.Conv2d's arguments + eps."""

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
