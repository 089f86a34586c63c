"""CBN's training step as Triton kernels (see :mod:`mmnorm.layers.cbn.layer` for the
equations and :mod:`mmnorm.layers.shared.kernels` for the split over programs).

Forward: the patch sums S_mu of the feeding conv's input (only when the step
pushes with rho != 0: one weight-gradient convolution with ones as the output
gradient, see docs/kernels.md), the partial sums of x - x[0, c, 0] and their
squares, then one kernel per channel block (:func:`cbn_statistics_kernel`)
that reduces them to mu_t and var_t, moves the k stored steps to theta_t (the
dot products with theta_t - theta_tau read from the ring), pools the kept
ones, updates the running statistics and pushes this step into the ring slot;
last, the output pass (:func:`cbn_output_kernel`), whose first program also
writes the slot's mean derivative and advances the push counter, after every
program of the statistics kernel has read them. The conv's weight gradient
S_nu (one ATen convolution_backward) comes in ready. Backward: the shared
normalized backward with share = 1 / count.

The pooled variance is accumulated around mu_t: with d_i = mu_i - mu_t over
the c pooled steps (d_t = 0), mu = mu_t + sum(d) / c and sigma2 = (sum(var_i)
+ sum(d^2)) / c - (sum(d) / c)^2, clamped at 0; the same number as the
pooled form of :func:`mmnorm.layers.cbn.layer.pooled_statistics`.
"""
import triton
import triton.language as tl

from ..._torch import convolution_backward
from ..launching import count_device_kernels, launch
from ..shared.kernels import (
    MAX_TILE,
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

MAX_BLOCK_F = 64  # weight elements per channel a program loads per loop step


def weight_tile(block_c):
    """BLOCK_F for a program of ``block_c`` channels: the ring's loops load
    (block_c, BLOCK_F) tiles of at most MAX_TILE numbers."""
    return min(MAX_BLOCK_F, MAX_TILE // block_c)


@triton.jit
def cbn_statistics_kernel(x_ptr, running_mean_ptr, running_var_ptr, pushes_ptr, flags_ptr,
                          saved_ptr, partial_ptr, mean_ptr, sqmean_ptr, valid_ptr, dmean_ptr,
                          dsqmean_ptr, theta_ring_ptr, theta_ptr, patch_ptr, dnu_ptr, N, C, L,
                          stride_c, CHUNKS, K, F, group_channels, window, eps_bits,
                          momentum_bits, rho_bits, POOL: tl.constexpr, PUSH: tl.constexpr,
                          COMPENSATE: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr):
    ACC: tl.constexpr = saved_ptr.dtype.element_ty
    c, cmask = channels(BLOCK_C, C)
    eps = as_float(eps_bits, ACC)
    momentum = as_float(momentum_bits, ACC)
    rho = as_float(rho_bits, ACC)
    count_x = element_count(N, L, ACC)
    mu_t, var_t = moments(x_ptr, partial_ptr, c, cmask, C, stride_c, count_x, CHUNKS, ACC,
                          BLOCK_C, BLOCK_K)

    # The ring: rows (slot, channel) of this program's channels; the mean
    # derivative's rows are per group (F numbers), weight-shaped ones per channel.
    pushes = tl.load(pushes_ptr)
    slot = pushes % K
    used = tl.minimum(tl.minimum(pushes, window), K)  # newest slots in the window
    rows = c.to(tl.int64)[:, None] * F
    group_rows = (c // group_channels).to(tl.int64)[:, None] * F
    count = tl.full([BLOCK_C], 1.0, ACC)
    mean_shift = tl.zeros([BLOCK_C], dtype=ACC)  # sum of d_i
    spread = var_t  # sum of var_i + d_i^2
    if POOL:
        for tau in range(0, K):
            age = (pushes - 1 - tau + K) % K
            ring_mean = tl.load(mean_ptr + tau * C + c, mask=cmask, other=0.0).to(ACC)
            ring_sqmean = tl.load(sqmean_ptr + tau * C + c, mask=cmask, other=0.0).to(ACC)
            stored = tl.load(valid_ptr + tau * C + c, mask=cmask, other=0) == 1
            if COMPENSATE:
                mu_dot = tl.zeros([BLOCK_C, BLOCK_F], dtype=ACC)
                nu_dot = tl.zeros([BLOCK_C, BLOCK_F], dtype=ACC)
                ring = tl.cast(tau, tl.int64) * C * F
                group_ring = tl.cast(tau, tl.int64) * (C // group_channels) * F
                for start in range(0, F, BLOCK_F):
                    f = start + tl.arange(0, BLOCK_F)[None, :]
                    fmask = cmask[:, None] & (f < F)
                    delta = (tl.load(theta_ptr + rows + f, mask=fmask, other=0.0).to(ACC)
                             - tl.load(theta_ring_ptr + ring + rows + f, mask=fmask,
                                       other=0.0).to(ACC))
                    dmu = tl.load(dmean_ptr + group_ring + group_rows + f, mask=fmask,
                                  other=0.0).to(ACC)
                    dnu = tl.load(dsqmean_ptr + ring + rows + f, mask=fmask, other=0.0).to(ACC)
                    mu_dot += delta * dmu
                    nu_dot += delta * dnu
                ring_mean = ring_mean + rho * tl.sum(mu_dot, 1)
                ring_sqmean = ring_sqmean + rho * tl.sum(nu_dot, 1)
            ring_var = ring_sqmean - ring_mean * ring_mean
            keep = stored & (ring_var >= 0) & (age < used)
            d = ring_mean - mu_t
            count += tl.where(keep, 1.0, 0.0)
            mean_shift += tl.where(keep, d, 0.0)
            spread += tl.where(keep, ring_var + d * d, 0.0)
    mean_shift = mean_shift / count
    mu = mu_t + mean_shift
    sigma2 = tl.maximum(spread / count - mean_shift * mean_shift, 0.0)
    inv_std = 1.0 / tl.sqrt(sigma2 + eps)

    finite = isfinite(mu_t) & isfinite(var_t)
    note_nonfinite(flags_ptr, finite, cmask)
    running_mean = tl.load(running_mean_ptr + c, mask=cmask, other=0.0).to(ACC)
    running_var = tl.load(running_var_ptr + c, mask=cmask, other=1.0).to(ACC)
    tl.store(running_mean_ptr + c, tl.where(finite, running_mean + momentum * (
        mu_t - running_mean), running_mean).to(running_mean_ptr.dtype.element_ty), mask=cmask)
    elements = tl.cast(N, tl.int64) * L
    unbiased = var_t * count_x / tl.maximum(elements - 1, 1).to(tl.float64).to(ACC)
    tl.store(running_var_ptr + c, tl.where(finite & (elements > 1), running_var + momentum * (
        unbiased - running_var), running_var).to(running_var_ptr.dtype.element_ty), mask=cmask)

    if PUSH:
        valid = finite
        if COMPENSATE:
            # Store theta_t and dnu_t (non-finite numbers as 0); the entry is
            # valid if the sum of its dnu row, theta row and group's dmu is finite.
            check = tl.zeros([BLOCK_C, BLOCK_F], dtype=ACC)
            ring = slot.to(tl.int64) * C * F
            for start in range(0, F, BLOCK_F):
                f = start + tl.arange(0, BLOCK_F)[None, :]
                fmask = cmask[:, None] & (f < F)
                theta = tl.load(theta_ptr + rows + f, mask=fmask, other=0.0).to(ACC)
                dnu = tl.load(dnu_ptr + rows + f, mask=fmask, other=0.0).to(ACC) * 2.0 / count_x
                dmu = tl.load(patch_ptr + group_rows + f, mask=fmask, other=0.0).to(ACC) / count_x
                check += dnu + theta + dmu
                tl.store(theta_ring_ptr + ring + rows + f, tl.where(isfinite(theta), theta, 0.0)
                         .to(theta_ring_ptr.dtype.element_ty), mask=fmask)
                tl.store(dsqmean_ptr + ring + rows + f, tl.where(isfinite(dnu), dnu, 0.0)
                         .to(dsqmean_ptr.dtype.element_ty), mask=fmask)
            valid = valid & isfinite(tl.sum(check, 1))
        tl.store(mean_ptr + slot * C + c, tl.where(valid, mu_t, 0.0)
                 .to(mean_ptr.dtype.element_ty), mask=cmask)
        tl.store(sqmean_ptr + slot * C + c, tl.where(valid, var_t + mu_t * mu_t, 0.0)
                 .to(sqmean_ptr.dtype.element_ty), mask=cmask)
        tl.store(valid_ptr + slot * C + c, tl.where(valid, 1, 0).to(valid_ptr.dtype.element_ty),
                 mask=cmask)

    # For the backward: [mu, inv_std, r = 1, d = 0, share = 1 / count].
    tl.store(saved_ptr + c, mu, mask=cmask)
    tl.store(saved_ptr + C + c, inv_std, mask=cmask)
    tl.store(saved_ptr + 2 * C + c, tl.full([BLOCK_C], 1.0, ACC), mask=cmask)
    tl.store(saved_ptr + 3 * C + c, tl.zeros([BLOCK_C], dtype=ACC), mask=cmask)
    tl.store(saved_ptr + 4 * C + c, 1.0 / count, mask=cmask)


@triton.jit
def cbn_output_kernel(x_ptr, y_ptr, weight_ptr, bias_ptr, saved_ptr, pushes_ptr, dmean_ptr,
                      patch_ptr, N, C, L, stride_n, stride_c, stride_l, y_stride_n, y_stride_c,
                      y_stride_l, TILES_PER_CHUNK, K, GF, PUSH: tl.constexpr,
                      COMPENSATE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
                      BLOCK_F: tl.constexpr):
    """y = weight (x - mu) inv_std + bias over this program's chunk; the first
    program, with PUSH, then writes the slot's mean derivative (GF = groups x
    F numbers, when COMPENSATE) and advances the push counter."""
    ACC: tl.constexpr = saved_ptr.dtype.element_ty
    c, cmask = channels(BLOCK_C, C)
    mu = tl.load(saved_ptr + c, mask=cmask, other=0.0)
    inv_std = tl.load(saved_ptr + C + c, mask=cmask, other=0.0)
    weight = tl.load(weight_ptr + c, mask=cmask, other=0.0).to(ACC)
    bias = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(ACC)
    scale = weight * inv_std
    write_affine(x_ptr, y_ptr, scale[:, None], (bias - mu * scale)[:, None], c, cmask, N, L,
                 stride_n, stride_c, stride_l, y_stride_n, y_stride_c, y_stride_l,
                 TILES_PER_CHUNK, ACC, BLOCK_L)
    if PUSH:
        first = (tl.program_id(0) == 0) & (tl.program_id(1) == 0)
        pushes = tl.load(pushes_ptr)
        if COMPENSATE:
            count_x = element_count(N, L, ACC)
            ring = (pushes % K).to(tl.int64) * GF
            for start in range(0, GF, BLOCK_F):
                f = start + tl.arange(0, BLOCK_F)
                fmask = (f < GF) & first
                dmu = tl.load(patch_ptr + f, mask=fmask, other=0.0).to(ACC) / count_x
                tl.store(dmean_ptr + ring + f, tl.where(isfinite(dmu), dmu, 0.0)
                         .to(dmean_ptr.dtype.element_ty), mask=fmask)
        tl.store(pushes_ptr, pushes + 1, mask=first)


def patch_sums(conv, conv_input, dtype):
    """S_mu (C_in * kh * kw,) in ``dtype`` of the conv described by ``conv``
    (a ConvCall: numeric zero padding) on ``conv_input`` (N, C_in, H, W), see
    :func:`mmnorm.layers.conv_statistics.mean_derivative_sum`: the weight
    gradient of a one-output-channel, ungrouped conv for an output gradient
    of ones (two device kernels: the ones and the convolution)."""
    n, c_in, h, w = conv_input.shape
    kh, kw = conv.kernel_size
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    ones = conv_input.new_ones((n, 1, h_out, w_out), dtype=dtype)
    shape_only = conv_input.new_empty((1, c_in, kh, kw), dtype=dtype)
    count_device_kernels(2)
    return convolution_backward(ones, conv_input.to(dtype), shape_only, None, conv.stride,
                                conv.padding, conv.dilation, False, [0, 0], 1,
                                (False, True, False))[1].reshape(-1)


def forward(x, weight, bias, running_mean, running_var, pushes, flags, ring, theta,
            patch, dnu, groups, window, eps, momentum, rho, pool, push, cdtype):
    """(y, saved) for x (N, C, *): y of x's dtype laid out like x, ``saved`` =
    [mu, inv_std, 1, 0, 1 / count] (5C, ``cdtype``) for the shared backward.
    ``ring``: the six history buffers (mean, sqmean, valid, dmean, dsqmean,
    weight); theta (C, F) contiguous, patch (groups * F,) and dnu (C, F) the
    derivative sums when the step pushes with compensation (else None);
    ``window``: how many of the newest stored steps may be pooled. Updates
    the running statistics, the ring, the push counter and ``flags`` in
    place; three launches."""
    view = channel_view(x)
    (n, c, length), strides = view.shape, view.strides
    plan = split(view.shape, strides, target_programs(x.device))
    y, y_strides = output_like(view, x)
    saved = x.new_empty(5 * c, dtype=cdtype)
    compensate = theta is not None
    mean, sqmean, valid, dmean, dsqmean, theta_ring = ring
    k = mean.size(0) if mean.dim() == 2 else 1
    features = theta.size(1) if compensate else 1
    if not compensate:  # placeholders the kernel never reads
        theta = patch = dnu = saved
        dmean = dsqmean = theta_ring = saved
    if mean.dim() != 2:
        mean = sqmean = saved
        valid = pushes
    partial, _ = sum_partials(view, None, None, plan, MOMENTS, cdtype)
    blocks = plan.grid(c)[0]
    block_f = weight_tile(plan.block_c)
    launch(cbn_statistics_kernel, (blocks,), view.tensor, running_mean, running_var, pushes,
           flags, saved, partial, mean, sqmean, valid, dmean, dsqmean, theta_ring, theta, patch,
           dnu, n, c, length, strides[1], plan.chunks, k, features, c // groups, window,
           float_bits(eps), float_bits(momentum), float_bits(rho), POOL=pool, PUSH=push,
           COMPENSATE=compensate, BLOCK_C=plan.block_c, BLOCK_K=plan.block_k, BLOCK_F=block_f)
    launch(cbn_output_kernel, plan.grid(c), view.tensor, y, weight, bias, saved, pushes, dmean,
           patch, n, c, length, *strides, *y_strides, plan.tiles_per_chunk, k, groups * features,
           PUSH=push, COMPENSATE=compensate, BLOCK_C=plan.block_c, BLOCK_L=plan.block_l,
           BLOCK_F=block_f)
    return y, saved


def variants():
    """(kernel, argument types, constants) of every kernel variant the layer
    launches (see :func:`mmnorm.layers.ahead_of_time.compile_ahead_of_time`)."""
    from ..shared.kernels import dtypes_and_tiles, signature
    for (x, param, buffer, stats), plan in dtypes_and_tiles():
        pointers = dict(x_ptr=x, y_ptr=x, weight_ptr=param, bias_ptr=param,
                        running_mean_ptr=buffer, running_var_ptr=buffer, pushes_ptr='i64',
                        flags_ptr='i32', saved_ptr=stats, partial_ptr=stats, mean_ptr=buffer,
                        sqmean_ptr=buffer, valid_ptr='i64', dmean_ptr=buffer,
                        dsqmean_ptr=buffer, theta_ring_ptr=buffer, theta_ptr=param,
                        patch_ptr=stats, dnu_ptr=stats)
        block_f = weight_tile(plan.block_c)
        for pool, push, compensate in ((False, False, False), (False, True, False),
                                       (True, True, False), (False, True, True),
                                       (True, True, True)):
            flags = dict(POOL=pool, PUSH=push, COMPENSATE=compensate, BLOCK_C=plan.block_c,
                         BLOCK_F=block_f)
            constants = dict(flags, BLOCK_K=plan.block_k)
            yield (cbn_statistics_kernel, signature(cbn_statistics_kernel, pointers, constants),
                   constants)
            if pool:
                continue  # the output kernel does not depend on POOL
            constants = dict(flags, BLOCK_L=plan.block_l)
            del constants['POOL']
            yield (cbn_output_kernel, signature(cbn_output_kernel, pointers, constants),
                   constants)
