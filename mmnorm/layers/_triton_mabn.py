"""MABN's training step as two Triton kernels (see :mod:`mmnorm.layers.mabn`
for the equations and :mod:`mmnorm.layers._triton_shared` for the layout).

Forward, per channel: chi2_t = mean(x^2); the window row, v_t, r, the
running_var update, inv_std and the output y = x * (weight r inv_std) + bias,
one launch. Backward: sum(dy x) and sum(dy), psi_t into ``buffer_gz``, psi,
dweight, dbias and dx = dy * coef - x * psi inv_std^2, one launch.

``MODE`` 0 is the whole step; with ``sync_stats`` the step is split around the
all-reduce: ``MODE`` 1 only stores this process's sums, ``MODE`` 2 finishes
from the union's mean (``union``) and element count (``total``).
The window statistic sums the m - 1 rows that this step does not write and
the new row from registers, so no program reads what it writes.
"""
import torch
import triton
import triton.language as tl

from ._dist import union_mean
from ._kernels import launch
from ._triton_shared import (channel_view, isfinite, load_x_and_dy, note_nonfinite, tile,
                             tile_at, write_affine)

# MODE values (constexpr, so that the kernels can read them)
FULL, SUMS_ONLY, FROM_UNION = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _window(buffer_ptr, value, write, c, cmask, C, row, M, ACC: tl.constexpr):
    """Write ``value`` into ``buffer[row, c]`` where ``write``; return the
    mean of the m rows after the write (in ACC)."""
    others = tl.zeros_like(value)
    old = tl.zeros_like(value)
    for j in range(0, M):
        entry = tl.load(buffer_ptr + j * C + c, mask=cmask, other=0.0).to(ACC)
        others += tl.where(j == row, 0.0, entry)
        old = tl.where(j == row, entry, old)
    new = tl.where(write, value, old)
    tl.store(buffer_ptr + row * C + c, new.to(buffer_ptr.dtype.element_ty), mask=cmask)
    return (others + new) / M


@triton.jit
def mabn_forward_kernel(x_ptr, y_ptr, weight_ptr, bias_ptr, running_var_ptr, buffer_ptr, t_ptr,
                        flags_ptr, saved_ptr, sums_ptr, union_ptr, total_ptr,
                        N, C, L, stride_n, stride_c, stride_l,
                        M, warmup_iters, renorm_after, eps, momentum, rmax, inv_count,
                        MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    ACC: tl.constexpr = saved_ptr.dtype.element_ty
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    channel = c.to(tl.int64)[:, None] * stride_c
    if MODE != FROM_UNION:
        squares = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
        for n in range(0, N):
            for start in range(0, L, BLOCK_L):
                offsets, mask = tile_at(n, start, channel, cmask, L, stride_n, stride_l, BLOCK_L)
                value = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
                squares += value * value
        square_sum = tl.sum(squares, 1)
    if MODE == SUMS_ONLY:
        tl.store(sums_ptr + c, square_sum, mask=cmask)
    else:
        if MODE == FULL:
            chi2 = square_sum * inv_count
            present = True
        else:
            chi2 = tl.load(union_ptr + c, mask=cmask, other=0.0)
            present = tl.load(total_ptr) > 0
        t = tl.load(t_ptr)  # advanced by the layer before the step
        row = t % M
        early = (t <= M) | (t < warmup_iters)
        finite = isfinite(chi2)
        note_nonfinite(flags_ptr, finite, cmask)
        # (where, not &: Triton's interpreter cannot 'and' a loaded scalar with a block)
        window = _window(buffer_ptr, chi2, tl.where(present, finite, False), c, cmask, C, row, M,
                         ACC)
        v = tl.where(early, chi2, window)
        std = tl.sqrt(v + eps)
        running = tl.load(running_var_ptr + c, mask=cmask, other=1.0).to(ACC)
        ratio = std / tl.sqrt(running + eps)
        r = tl.where(t > renorm_after, tl.minimum(tl.maximum(ratio, 1.0 / rmax), rmax), 1.0)
        new_running = momentum * running + (1.0 - momentum) * v
        new_running = tl.where(tl.where(present, isfinite(new_running), False), new_running,
                               running)
        tl.store(running_var_ptr + c, new_running.to(running_var_ptr.dtype.element_ty),
                 mask=cmask)
        inv_std = 1.0 / std
        tl.store(saved_ptr + c, inv_std, mask=cmask)
        tl.store(saved_ptr + C + c, r, mask=cmask)
        if tl.program_id(0) == 0:
            tl.store(saved_ptr + 2 * C, row.to(ACC))
            tl.store(saved_ptr + 2 * C + 1, early.to(ACC))
        weight = tl.load(weight_ptr + c, mask=cmask, other=0.0).to(ACC)
        bias = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(ACC)
        write_affine(x_ptr, y_ptr, (weight * r * inv_std)[:, None], bias[:, None], channel,
                     cmask, N, L, stride_n, stride_l, ACC, BLOCK_L)


@triton.jit
def mabn_backward_kernel(dy_ptr, x_ptr, dx_ptr, weight_ptr, saved_ptr, buffer_ptr, flags_ptr,
                         dweight_ptr, dbias_ptr, sums_ptr, union_ptr, total_ptr,
                         N, C, L, stride_n, stride_c, stride_l, dy_stride_n, dy_stride_c,
                         dy_stride_l, M, inv_count,
                         MODE: tl.constexpr, NEED_DX: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_L: tl.constexpr):
    ACC: tl.constexpr = saved_ptr.dtype.element_ty
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    channel = c.to(tl.int64)[:, None] * stride_c
    dy_channel = c.to(tl.int64)[:, None] * dy_stride_c
    if MODE != FROM_UNION:
        products = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
        grads = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
        for n in range(0, N):
            for start in range(0, L, BLOCK_L):
                x, dy, _, _ = load_x_and_dy(x_ptr, dy_ptr, n, start, channel, dy_channel, cmask,
                                            L, stride_n, stride_l, dy_stride_n, dy_stride_l, ACC,
                                            BLOCK_L)
                products += dy * x
                grads += dy
        dot = tl.sum(products, 1)
        dy_sum = tl.sum(grads, 1)
    else:
        dot = tl.load(sums_ptr + c, mask=cmask, other=0.0)
        dy_sum = tl.load(sums_ptr + C + c, mask=cmask, other=0.0)
    if MODE == SUMS_ONLY:
        tl.store(sums_ptr + c, dot, mask=cmask)
        tl.store(sums_ptr + C + c, dy_sum, mask=cmask)
    else:
        inv_std = tl.load(saved_ptr + c, mask=cmask, other=0.0)
        r = tl.load(saved_ptr + C + c, mask=cmask, other=0.0)
        row = tl.load(saved_ptr + 2 * C).to(tl.int64)
        early = tl.load(saved_ptr + 2 * C + 1) != 0
        weight = tl.load(weight_ptr + c, mask=cmask, other=0.0).to(ACC)
        coef = weight * r * inv_std
        if MODE == FULL:
            psi_t = coef * dot * inv_count
            present = True
        else:
            psi_t = coef * tl.load(union_ptr + c, mask=cmask, other=0.0)
            present = tl.load(total_ptr) > 0
        finite = isfinite(psi_t)
        note_nonfinite(flags_ptr, finite, cmask)
        window = _window(buffer_ptr, psi_t, tl.where(present, finite, False), c, cmask, C, row,
                         M, ACC)
        psi = tl.where(early, psi_t, window)
        tl.store(dweight_ptr + c, (r * inv_std * dot).to(dweight_ptr.dtype.element_ty),
                 mask=cmask)
        tl.store(dbias_ptr + c, dy_sum.to(dbias_ptr.dtype.element_ty), mask=cmask)
        if NEED_DX:
            x_coef = (psi * inv_std * inv_std)[:, None]
            dy_coef = coef[:, None]
            for n in range(0, N):
                for start in range(0, L, BLOCK_L):
                    x, dy, offsets, mask = load_x_and_dy(
                        x_ptr, dy_ptr, n, start, channel, dy_channel, cmask, L, stride_n,
                        stride_l, dy_stride_n, dy_stride_l, ACC, BLOCK_L)
                    tl.store(dx_ptr + offsets, (dy * dy_coef - x * x_coef).to(
                        dx_ptr.dtype.element_ty), mask=mask)


def forward(x, weight, bias, running_var, buffer_x2, counter, flags, eps, momentum,
            warmup_iters, renorm_after, rmax, out_dtype, cdtype, sync):
    """(y, saved) for x (N, C, *): y of ``out_dtype`` laid out like x, and
    ``saved`` = [inv_std (C), r (C), row, early] in ``cdtype`` for
    :func:`backward`. Updates ``running_var``, ``buffer_x2``, ``counter`` and
    ``flags`` in place; one launch (two and an all-reduce with ``sync``)."""
    x, (n, c, length), strides = channel_view(x)
    y = torch.empty_like(x, dtype=out_dtype)
    saved = x.new_empty(2 * c + 2, dtype=cdtype)
    count = n * length
    block_c, block_l = tile(c, length, strides)
    grid = (triton.cdiv(c, block_c),)

    def run(mode, sums=saved, union=saved, total=saved):
        launch(mabn_forward_kernel, grid, x, y, weight, bias, running_var, buffer_x2, counter,
               flags, saved, sums, union, total, n, c, length, *strides, buffer_x2.size(0),
               warmup_iters, renorm_after, eps, momentum, rmax, 1.0 / max(count, 1),
               MODE=mode.value, BLOCK_C=block_c, BLOCK_L=block_l)

    if not sync:
        run(FULL)
        return y, saved
    sums = x.new_empty(c, dtype=cdtype)
    run(SUMS_ONLY, sums=sums)
    union, total = union_mean(sums, count)
    run(FROM_UNION, union=union, total=total)
    return y, saved


def backward(dy, x, weight, saved, buffer_gz, flags, bias_dtype, sync, need_dx):
    """(dx, dweight, dbias) of :func:`forward` for the incoming ``dy``, dx
    laid out like x (empty unless ``need_dx``); writes psi_t into
    ``buffer_gz`` at the forward's row."""
    x, (n, c, length), strides = channel_view(x)
    dy, _, dy_strides = channel_view(dy)
    cdtype = saved.dtype
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    dweight = torch.empty_like(weight)
    dbias = torch.empty_like(weight, dtype=bias_dtype)
    count = n * length
    block_c, block_l = tile(c, length, strides)
    grid = (triton.cdiv(c, block_c),)

    def run(mode, sums=saved, union=saved, total=saved):
        launch(mabn_backward_kernel, grid, dy, x, dx, weight, saved, buffer_gz, flags, dweight,
               dbias, sums, union, total, n, c, length, *strides, *dy_strides,
               buffer_gz.size(0), 1.0 / max(count, 1), MODE=mode.value, NEED_DX=need_dx,
               BLOCK_C=block_c, BLOCK_L=block_l)

    if not sync:
        run(FULL)
        return dx, dweight, dbias
    sums = x.new_empty(2 * c, dtype=cdtype)
    run(SUMS_ONLY, sums=sums)
    union, total = union_mean(sums[:c], count)
    run(FROM_UNION, sums=sums, union=union, total=total)
    return dx, dweight, dbias


def variants():
    """(kernel, argument types, constants) of every kernel variant the layer
    launches (see :func:`mmnorm.layers._kernels.compile_ahead_of_time`)."""
    from ._triton_shared import dtypes_and_tiles, signature
    for (x, param, buffer, stats), (block_c, block_l) in dtypes_and_tiles():
        pointers = dict(x_ptr=x, y_ptr=x, dy_ptr=x, dx_ptr=x, weight_ptr=param, bias_ptr=param,
                        dweight_ptr=param, dbias_ptr=param, running_var_ptr=buffer,
                        buffer_ptr=buffer, t_ptr='i64', flags_ptr='i32', saved_ptr=stats,
                        sums_ptr=stats, union_ptr=stats, total_ptr=stats)
        for mode in (FULL, SUMS_ONLY, FROM_UNION):
            constants = dict(MODE=mode.value, BLOCK_C=block_c, BLOCK_L=block_l)
            yield (mabn_forward_kernel, signature(mabn_forward_kernel, pointers, constants),
                   constants)
            for need_dx in (True, False) if mode != SUMS_ONLY else (True,):
                backward = dict(constants, NEED_DX=need_dx)
                yield (mabn_backward_kernel, signature(mabn_backward_kernel, pointers, backward),
                       backward)
