"""BRN's training step as Triton kernels (see :mod:`mmnorm.layers.brn.layer` for the
equations and :mod:`mmnorm.layers.shared.kernels` for the split over programs).

Forward: the partial sums of x - x[0, c, 0] and their squares (with a copy of
the running statistics), then one kernel: mu_B and sigma_B, the clipping
bounds from the step counter, r, d, the running statistics and the output
y = x * scale + shift. Backward: BatchNorm's backward with gamma = weight * r,
dweight = r * sum(dy x_hat) + d * sum(dy) (the shared normalized backward).
Two launches per direction.
"""
import triton
import triton.language as tl

from ..launching import launch
from ..shared.kernels import (
    MOMENTS,
    as_float,
    channel_view,
    channels,
    element_count,
    float_bits,
    isfinite,
    moments,
    note_nonfinite,
    output_like,
    split,
    sum_partials,
    target_programs,
    write_affine,
)


@triton.jit
def brn_forward_kernel(x_ptr, y_ptr, weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr,
                       t_ptr, flags_ptr, saved_ptr, partial_ptr, old_ptr, N, C, L, stride_n,
                       stride_c, stride_l, y_stride_n, y_stride_c, y_stride_l, CHUNKS,
                       TILES_PER_CHUNK, warmup_iters, rmax_iters, dmax_iters, eps_bits,
                       momentum_bits, rmax_bits, dmax_bits, BLOCK_C: tl.constexpr,
                       BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
    ACC: tl.constexpr = saved_ptr.dtype.element_ty
    c, cmask = channels(BLOCK_C, C)
    owner = cmask & (tl.program_id(1) == 0)
    eps = as_float(eps_bits, ACC)
    momentum = as_float(momentum_bits, ACC)
    rmax = as_float(rmax_bits, ACC)
    dmax = as_float(dmax_bits, ACC)
    mean, var = moments(x_ptr, partial_ptr, c, cmask, C, stride_c, element_count(N, L, ACC),
                        CHUNKS, ACC, BLOCK_C, BLOCK_K)
    std = tl.sqrt(var + eps)

    t = tl.load(t_ptr)  # advanced by the layer before the step
    steps = t.to(ACC) - warmup_iters
    r_max = 1.0 + (rmax - 1.0) * tl.minimum(tl.maximum(steps / (rmax_iters - warmup_iters), 0.0),
                                            1.0)
    d_max = dmax * tl.minimum(tl.maximum(steps / (dmax_iters - warmup_iters), 0.0), 1.0)
    # the running statistics before this step (copied by the first launch)
    running_mean = tl.load(old_ptr + c, mask=cmask, other=0.0)
    running_var = tl.load(old_ptr + C + c, mask=cmask, other=1.0)
    std_running = tl.sqrt(running_var + eps)
    r = tl.minimum(tl.maximum(std / std_running, 1.0 / r_max), r_max)
    d = tl.minimum(tl.maximum((mean - running_mean) / std_running, -d_max), d_max)
    finite = isfinite(mean) & isfinite(std)
    note_nonfinite(flags_ptr, finite, cmask)
    new_std = std_running + momentum * (std - std_running)
    new_mean = running_mean + momentum * (mean - running_mean)
    tl.store(running_mean_ptr + c, tl.where(finite, new_mean, running_mean).to(
        running_mean_ptr.dtype.element_ty), mask=owner)
    tl.store(running_var_ptr + c, tl.where(finite, new_std * new_std - eps, running_var).to(
        running_var_ptr.dtype.element_ty), mask=owner)

    inv_std = 1.0 / std
    tl.store(saved_ptr + c, mean, mask=owner)
    tl.store(saved_ptr + C + c, inv_std, mask=owner)
    tl.store(saved_ptr + 2 * C + c, r, mask=owner)
    tl.store(saved_ptr + 3 * C + c, d, mask=owner)
    weight = tl.load(weight_ptr + c, mask=cmask, other=0.0).to(ACC)
    bias = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(ACC)
    scale = weight * r * inv_std
    write_affine(x_ptr, y_ptr, scale[:, None], (weight * d + bias - mean * scale)[:, None], c,
                 cmask, N, L, stride_n, stride_c, stride_l, y_stride_n, y_stride_c, y_stride_l,
                 TILES_PER_CHUNK, ACC, BLOCK_L)


def forward(x, weight, bias, running_mean, running_var, counter, flags, eps, momentum, rmax,
            dmax, warmup_iters, rmax_iters, dmax_iters, cdtype):
    """(y, saved) for x (N, C, *): y of x's dtype laid out like x, ``saved`` =
    [mu_B, 1 / sigma_B, r, d] (4C, ``cdtype``) for
    :func:`mmnorm.layers.shared.kernels.normalized_backward`. Updates
    the running statistics and ``flags`` in place (``counter`` holds this
    step's t); two launches."""
    view = channel_view(x)
    (n, c, length), strides = view.shape, view.strides
    plan = split(view.shape, strides, target_programs(x.device))
    y, y_strides = output_like(view, x)
    saved = x.new_empty(4 * c, dtype=cdtype)
    partial, old = sum_partials(view, None, None, plan, MOMENTS, cdtype,
                                state=(running_mean, running_var))
    launch(brn_forward_kernel, plan.grid(c), view.tensor, y, weight, bias, running_mean,
           running_var, counter, flags, saved, partial, old, n, c, length, *strides, *y_strides,
           plan.chunks, plan.tiles_per_chunk, warmup_iters, rmax_iters, dmax_iters, float_bits(eps),
           float_bits(momentum), float_bits(rmax), float_bits(dmax), BLOCK_C=plan.block_c,
           BLOCK_L=plan.block_l, BLOCK_K=plan.block_k)
    return y, saved


def variants():
    """(kernel, argument types, constants) of every kernel variant the layer
    launches (see :func:`mmnorm.layers.ahead_of_time.compile_ahead_of_time`)."""
    from ..shared.kernels import dtypes_and_tiles, signature
    for (x, param, buffer, stats), plan in dtypes_and_tiles():
        pointers = dict(x_ptr=x, y_ptr=x, weight_ptr=param, bias_ptr=param,
                        running_mean_ptr=buffer, running_var_ptr=buffer, t_ptr='i64',
                        flags_ptr='i32', saved_ptr=stats, partial_ptr=stats, old_ptr=stats)
        constants = dict(BLOCK_C=plan.block_c, BLOCK_L=plan.block_l, BLOCK_K=plan.block_k)
        yield brn_forward_kernel, signature(brn_forward_kernel, pointers, constants), constants
