"""BRN's training step as two Triton kernels (see :mod:`mmnorm.layers.brn` for
the equations and :mod:`mmnorm.layers._triton_shared` for the layout).

Forward, per channel: mu_B and sigma_B (sums of x - x[0, c, 0], which keeps
the variance free of cancellation for data far from zero), the clipping
bounds from the step counter, r, d, the running statistics and the output
y = x * scale + shift, one launch. Backward: BatchNorm's backward with gamma
= weight * r, dweight = r * sum(dy x_hat) + d * sum(dy), one launch.
"""
import torch
import triton
import triton.language as tl

from ._kernels import launch
from ._triton_shared import (channel_view, isfinite, note_nonfinite, shifted_moments, tile,
                             write_affine)


@triton.jit
def brn_forward_kernel(x_ptr, y_ptr, weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr,
                       t_ptr, flags_ptr, saved_ptr, N, C, L, stride_n, stride_c, stride_l,
                       eps, momentum, rmax, dmax, warmup_iters, rmax_iters, dmax_iters,
                       inv_count, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    ACC: tl.constexpr = saved_ptr.dtype.element_ty
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean, var = shifted_moments(x_ptr, c, cmask, N, L, stride_n, stride_c, stride_l, inv_count,
                                ACC, BLOCK_C, BLOCK_L)
    std = tl.sqrt(var + eps)

    t = tl.load(t_ptr)  # advanced by the layer before the step
    steps = t.to(ACC) - warmup_iters
    r_max = 1.0 + (rmax - 1.0) * tl.minimum(tl.maximum(steps / (rmax_iters - warmup_iters), 0.0),
                                            1.0)
    d_max = dmax * tl.minimum(tl.maximum(steps / (dmax_iters - warmup_iters), 0.0), 1.0)
    running_mean = tl.load(running_mean_ptr + c, mask=cmask, other=0.0).to(ACC)
    running_var = tl.load(running_var_ptr + c, mask=cmask, other=1.0).to(ACC)
    std_running = tl.sqrt(running_var + eps)
    r = tl.minimum(tl.maximum(std / std_running, 1.0 / r_max), r_max)
    d = tl.minimum(tl.maximum((mean - running_mean) / std_running, -d_max), d_max)
    finite = isfinite(mean) & isfinite(std)
    note_nonfinite(flags_ptr, finite, cmask)
    new_std = std_running + momentum * (std - std_running)
    new_mean = running_mean + momentum * (mean - running_mean)
    tl.store(running_mean_ptr + c, tl.where(finite, new_mean, running_mean).to(
        running_mean_ptr.dtype.element_ty), mask=cmask)
    tl.store(running_var_ptr + c, tl.where(finite, new_std * new_std - eps, running_var).to(
        running_var_ptr.dtype.element_ty), mask=cmask)

    inv_std = 1.0 / std
    tl.store(saved_ptr + c, mean, mask=cmask)
    tl.store(saved_ptr + C + c, inv_std, mask=cmask)
    tl.store(saved_ptr + 2 * C + c, r, mask=cmask)
    tl.store(saved_ptr + 3 * C + c, d, mask=cmask)
    weight = tl.load(weight_ptr + c, mask=cmask, other=0.0).to(ACC)
    bias = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(ACC)
    scale = weight * r * inv_std
    write_affine(x_ptr, y_ptr, scale[:, None], (weight * d + bias - mean * scale)[:, None],
                 c.to(tl.int64)[:, None] * stride_c, cmask, N, L, stride_n, stride_l, ACC,
                 BLOCK_L)


def forward(x, weight, bias, running_mean, running_var, counter, flags, eps, momentum, rmax,
            dmax, warmup_iters, rmax_iters, dmax_iters, cdtype):
    """(y, saved) for x (N, C, *): y of x's dtype laid out like x, ``saved`` =
    [mu_B, 1 / sigma_B, r, d] (4C, ``cdtype``) for
    :func:`mmnorm.layers._triton_shared.normalized_backward`. Updates
    the running statistics and ``flags`` in place (``counter`` holds this
    step's t); one launch."""
    x, (n, c, length), strides = channel_view(x)
    y = torch.empty_like(x)
    saved = x.new_empty(4 * c, dtype=cdtype)
    block_c, block_l = tile(c, length, strides)
    launch(brn_forward_kernel, (triton.cdiv(c, block_c),), x, y, weight, bias, running_mean,
           running_var, counter, flags, saved, n, c, length, *strides, eps, momentum, rmax, dmax,
           warmup_iters, rmax_iters, dmax_iters, 1.0 / (n * length), BLOCK_C=block_c,
           BLOCK_L=block_l)
    return y, saved


def variants():
    """(kernel, argument types, constants) of every kernel variant the layer
    launches (see :func:`mmnorm.layers._kernels.compile_ahead_of_time`)."""
    from ._triton_shared import dtypes_and_tiles, signature
    for (x, param, buffer, stats), (block_c, block_l) in dtypes_and_tiles():
        pointers = dict(x_ptr=x, y_ptr=x, dy_ptr=x, dx_ptr=x, weight_ptr=param, bias_ptr=param,
                        dweight_ptr=param, dbias_ptr=param, running_mean_ptr=buffer,
                        running_var_ptr=buffer, t_ptr='i64', flags_ptr='i32', saved_ptr=stats)
        constants = dict(BLOCK_C=block_c, BLOCK_L=block_l)
        yield brn_forward_kernel, signature(brn_forward_kernel, pointers, constants), constants
