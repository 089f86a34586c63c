"""CBN's training step as Triton kernels (see :mod:`mmnorm.layers.cbn` for the
equations and :mod:`mmnorm.layers._triton_shared` for the layout).

Forward, two launches: the patch sums S_mu of the feeding conv's input (only
when the step pushes with rho != 0), then one kernel per channel block that
reduces x to mu_t and var_t, moves the k stored steps to theta_t (the dot
products with theta_t - theta_tau read from the ring), pools the kept ones,
updates the running statistics, pushes this step into the ring slot and
writes y. The conv's weight gradient S_nu (one ATen convolution_backward)
comes in ready. Backward: the shared normalized backward with share = 1 /
count, one launch.

The pooled variance is accumulated around mu_t: with d_i = mu_i - mu_t over
the c pooled steps (d_t = 0), mu = mu_t + sum(d) / c and sigma2 = (sum(var_i)
+ sum(d^2)) / c - (sum(d) / c)^2, clamped at 0; the same number as the
pooled form of :func:`mmnorm.layers.cbn.pooled_statistics`.
"""
import torch
import triton
import triton.language as tl

from ._kernels import launch
from ._triton_shared import (MAX_TILE, channel_view, isfinite, last_to_arrive, note_nonfinite,
                             shifted_moments, tile, write_affine)

MAX_BLOCK_F = 64  # weight elements per channel a program loads per loop step
KERNEL_POSITIONS = 64  # patch-sum tile: positions of the input per loop step


def weight_tile(block_c):
    """BLOCK_F for a program of ``block_c`` channels: the ring's loops load
    (block_c, BLOCK_F) tiles of at most MAX_TILE numbers."""
    return min(MAX_BLOCK_F, MAX_TILE // block_c)


@triton.jit
def patch_sum_kernel(x_ptr, out_ptr, N, H, W, stride_n, stride_c, stride_h, stride_w, H_out,
                     W_out, pad_h, pad_w, step_h, step_w, dil_h, dil_w, KH: tl.constexpr,
                     KW: tl.constexpr, KK: tl.constexpr, BLOCK_L: tl.constexpr):
    """out[ci, a, b] = sum over n and output positions (i, j) of x[n, ci, i *
    step_h + a * dil_h - pad_h, j * step_w + b * dil_w - pad_w] (zero outside
    x): the input the conv reads at kernel offset (a, b). One program per
    input channel; x is read once, each element added to the offsets that
    read it."""
    ACC: tl.constexpr = out_ptr.dtype.element_ty
    ci = tl.program_id(0)
    k = tl.arange(0, KK)
    a = (k // KW)[None, :]
    b = (k % KW)[None, :]
    kmask = k < KH * KW
    acc = tl.zeros([BLOCK_L, KK], dtype=ACC)
    base = ci.to(tl.int64) * stride_c
    for n in range(0, N):
        for start in range(0, H * W, BLOCK_L):
            pos = start + tl.arange(0, BLOCK_L)
            pmask = pos < H * W
            row = pos // W
            col = pos % W
            offsets = (base + tl.cast(n, tl.int64) * stride_n + row.to(tl.int64) * stride_h
                       + col.to(tl.int64) * stride_w)
            value = tl.load(x_ptr + offsets, mask=pmask, other=0.0).to(ACC)
            rows = row[:, None] + pad_h - a * dil_h  # i * step_h where (row, a) is read
            cols = col[:, None] + pad_w - b * dil_w
            read = ((rows >= 0) & (rows % step_h == 0) & (rows < H_out * step_h)
                    & (cols >= 0) & (cols % step_w == 0) & (cols < W_out * step_w))
            read = read & pmask[:, None] & kmask[None, :]
            acc += tl.where(read, value[:, None], 0.0)
    tl.store(out_ptr + ci * (KH * KW) + k, tl.sum(acc, 0), mask=kmask)


@triton.jit
def cbn_forward_kernel(x_ptr, y_ptr, weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr,
                       pushes_ptr, flags_ptr, saved_ptr, mean_ptr, sqmean_ptr, valid_ptr,
                       dmean_ptr, dsqmean_ptr, theta_ring_ptr, theta_ptr, patch_ptr, dnu_ptr,
                       N, C, L, stride_n, stride_c, stride_l, K, F, group_channels, groups, used,
                       eps, momentum, rho, inv_count, POOL: tl.constexpr,
                       PUSH: tl.constexpr, COMPENSATE: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_L: tl.constexpr, BLOCK_F: tl.constexpr):
    ACC: tl.constexpr = saved_ptr.dtype.element_ty
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mu_t, var_t = shifted_moments(x_ptr, c, cmask, N, L, stride_n, stride_c, stride_l,
                                  inv_count, ACC, BLOCK_C, BLOCK_L)

    # The ring: rows (slot, channel) of this program's channels; the mean
    # derivative's rows are per group (F numbers), weight-shaped ones per channel.
    pushes = tl.load(pushes_ptr)
    slot = pushes % K
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
                for start in range(0, F, BLOCK_F):
                    f = start + tl.arange(0, BLOCK_F)[None, :]
                    fmask = cmask[:, None] & (f < F)
                    delta = (tl.load(theta_ptr + rows + f, mask=fmask, other=0.0).to(ACC)
                             - tl.load(theta_ring_ptr + ring + rows + f, mask=fmask,
                                       other=0.0).to(ACC))
                    dmu = tl.load(dmean_ptr + tl.cast(tau, tl.int64) * groups * F + group_rows + f,
                                  mask=fmask, other=0.0).to(ACC)
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
    elements = N * L
    tl.store(running_mean_ptr + c, tl.where(finite, running_mean + momentum * (
        mu_t - running_mean), running_mean).to(running_mean_ptr.dtype.element_ty), mask=cmask)
    unbiased = var_t * elements / tl.maximum(elements - 1, 1)
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
                dnu = tl.load(dnu_ptr + rows + f, mask=fmask, other=0.0).to(ACC) * inv_count * 2.0
                dmu = tl.load(patch_ptr + group_rows + f, mask=fmask, other=0.0).to(ACC) * (
                    inv_count)
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
    weight = tl.load(weight_ptr + c, mask=cmask, other=0.0).to(ACC)
    bias = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(ACC)
    scale = weight * inv_std
    write_affine(x_ptr, y_ptr, scale[:, None], (bias - mu * scale)[:, None],
                 c.to(tl.int64)[:, None] * stride_c, cmask, N, L, stride_n, stride_l, ACC,
                 BLOCK_L)

    # The last program, once every program has read the ring: the push
    # counter and the slot's mean derivative (shared by the programs of a group).
    if PUSH:
        last = last_to_arrive(flags_ptr)
        tl.store(pushes_ptr, pushes + 1, mask=last)
        if COMPENSATE:
            ring = slot.to(tl.int64) * groups * F
            for start in range(0, groups * F, BLOCK_F):
                f = start + tl.arange(0, BLOCK_F)
                fmask = (f < groups * F) & last
                dmu = tl.load(patch_ptr + f, mask=fmask, other=0.0).to(ACC) * inv_count
                tl.store(dmean_ptr + ring + f, tl.where(isfinite(dmu), dmu, 0.0)
                         .to(dmean_ptr.dtype.element_ty), mask=fmask)


def patch_sums(conv, conv_input, dtype):
    """S_mu (C_in * kh * kw,) in ``dtype`` of the conv described by ``conv``
    (a ConvCall: numeric zero padding) on ``conv_input`` (N, C_in, H, W),
    see :func:`mmnorm.layers.conv_statistics.conv_statistic_derivative_sums`.
    One launch."""
    n, c_in, h, w = conv_input.shape
    kh, kw = conv.kernel_size
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = conv_input.new_empty(c_in * kh * kw, dtype=dtype)
    launch(patch_sum_kernel, (c_in,), conv_input, out, n, h, w, *conv_input.stride(), h_out,
           w_out, ph, pw, sh, sw, dh, dw, KH=kh, KW=kw, KK=triton.next_power_of_2(kh * kw),
           BLOCK_L=KERNEL_POSITIONS)
    return out


def forward(x, weight, bias, running_mean, running_var, pushes, flags, ring, theta,
            patch, dnu, groups, used, eps, momentum, rho, pool, push, cdtype):
    """(y, saved) for x (N, C, *): y of x's dtype laid out like x, ``saved`` =
    [mu, inv_std, 1, 0, 1 / count] (5C, ``cdtype``) for the shared backward.
    ``ring``: the six history buffers (mean, sqmean, valid, dmean, dsqmean,
    weight); theta (C, F) contiguous, patch (groups * F,) and dnu (C, F) the
    derivative sums when the step pushes with compensation (else None).
    Updates the running statistics, the ring, the push counter and ``flags``
    in place; one launch."""
    x, (n, c, length), strides = channel_view(x)
    y = torch.empty_like(x)
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
    block_c, block_l = tile(c, length, strides)
    launch(cbn_forward_kernel, (triton.cdiv(c, block_c),), x, y, weight, bias, running_mean,
           running_var, pushes, flags, saved, mean, sqmean, valid, dmean, dsqmean,
           theta_ring, theta, patch, dnu, n, c, length, *strides, k, features, c // groups,
           groups, used, eps, momentum, rho, 1.0 / max(n * length, 1), POOL=pool, PUSH=push,
           COMPENSATE=compensate, BLOCK_C=block_c, BLOCK_L=block_l,
           BLOCK_F=weight_tile(block_c))
    return y, saved


def variants():
    """(kernel, argument types, constants) of every kernel variant the layer
    launches (see :func:`mmnorm.layers._kernels.compile_ahead_of_time`)."""
    from ._triton_shared import dtypes_and_tiles, signature
    for (x, param, buffer, stats), (block_c, block_l) in dtypes_and_tiles():
        pointers = dict(x_ptr=x, y_ptr=x, weight_ptr=param, bias_ptr=param,
                        running_mean_ptr=buffer, running_var_ptr=buffer, pushes_ptr='i64',
                        flags_ptr='i32', saved_ptr=stats, mean_ptr=buffer, sqmean_ptr=buffer,
                        valid_ptr='i64', dmean_ptr=buffer, dsqmean_ptr=buffer,
                        theta_ring_ptr=buffer, theta_ptr=param, patch_ptr=stats, dnu_ptr=stats)
        for pool, push, compensate in ((False, False, False), (False, True, False),
                                       (True, True, False), (False, True, True),
                                       (True, True, True)):
            constants = dict(POOL=pool, PUSH=push, COMPENSATE=compensate, BLOCK_C=block_c,
                             BLOCK_L=block_l, BLOCK_F=weight_tile(block_c))
            yield (cbn_forward_kernel, signature(cbn_forward_kernel, pointers, constants),
                   constants)
        if block_c == 1:  # the patch sums: one tile, 1 x 1 and 3 x 3 kernels
            for kh in (1, 3):
                constants = dict(KH=kh, KW=kh, KK=triton.next_power_of_2(kh * kh),
                                 BLOCK_L=KERNEL_POSITIONS)
                pointers = dict(x_ptr=x, out_ptr=stats)
                yield (patch_sum_kernel, signature(patch_sum_kernel, pointers, constants),
                       constants)
