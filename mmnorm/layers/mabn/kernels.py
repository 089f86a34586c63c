"""MABN's training step as Triton kernels (see :mod:`mmnorm.layers.mabn.layer` for the
equations and :mod:`mmnorm.layers.shared.kernels` for the split over programs).

Forward: the partial sums of x^2 (with a copy of running_var), then one
kernel: chi2_t, the window row, v_t, r, the running_var update, inv_std and
y = x * (weight r inv_std) + bias. Backward: the partial sums of dy x and dy,
then one kernel: psi_t into ``buffer_gz``, psi, dweight, dbias and
dx = dy * coef - x * psi inv_std^2. Two launches per direction.

With ``sync_stats`` the partials are summed per process and all-reduced
between the two launches (``FROM_UNION``: the second reads the union's mean
``union`` and element count ``total``). The window statistic sums the m - 1
rows that this step does not write and the new row from registers; the row
is written by the chunk-0 program of each channel block with the value every
program of the block computes, so what another program reads there is the
same before and after the write.
"""
import triton
import triton.language as tl

from ..distributed import union_mean
from ..launching import launch
from ..shared.kernels import (
    PRODUCTS,
    SQUARES,
    as_float,
    channel_view,
    channels,
    element_count,
    float_bits,
    isfinite,
    note_nonfinite,
    output_like,
    split,
    start_backward,
    sum_partials,
    target_programs,
    total,
    write_affine,
    write_input_grad,
)


@triton.jit
def _window(buffer_ptr, value, write, c, cmask, C, row, M, owner, ACC: tl.constexpr):
    """The mean of the m rows of ``buffer`` once ``value`` is in row ``row``
    where ``write`` (the old entry stays elsewhere); the ``owner`` program
    stores the row."""
    others = tl.zeros_like(value)
    old = tl.zeros_like(value)
    for j in range(0, M):
        entry = tl.load(buffer_ptr + j * C + c, mask=cmask, other=0.0).to(ACC)
        others += tl.where(j == row, 0.0, entry)
        old = tl.where(j == row, entry, old)
    new = tl.where(write, value, old)
    tl.store(buffer_ptr + row * C + c, new.to(buffer_ptr.dtype.element_ty), mask=cmask & owner)
    return (others + new) / M


@triton.jit
def mabn_forward_kernel(x_ptr, y_ptr, weight_ptr, bias_ptr, running_var_ptr, buffer_ptr, t_ptr,
                        flags_ptr, saved_ptr, partial_ptr, old_ptr, union_ptr, total_ptr,
                        N, C, L, stride_n, stride_c, stride_l, y_stride_n, y_stride_c,
                        y_stride_l, CHUNKS, TILES_PER_CHUNK, M, warmup_iters, renorm_after,
                        eps_bits, momentum_bits, rmax_bits, FROM_UNION: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
    ACC: tl.constexpr = saved_ptr.dtype.element_ty
    c, cmask = channels(BLOCK_C, C)
    owner = tl.program_id(1) == 0
    eps = as_float(eps_bits, ACC)
    momentum = as_float(momentum_bits, ACC)
    rmax = as_float(rmax_bits, ACC)
    if FROM_UNION:
        chi2 = tl.load(union_ptr + c, mask=cmask, other=0.0)
        present = tl.load(total_ptr) > 0
    else:
        chi2 = (total(partial_ptr, 0, c, cmask, C, CHUNKS, ACC, BLOCK_C, BLOCK_K)
                / element_count(N, L, ACC))
        present = True
    t = tl.load(t_ptr)  # advanced by the layer before the step
    row = t % M
    early = (t <= M) | (t < warmup_iters)
    finite = isfinite(chi2)
    note_nonfinite(flags_ptr, finite, cmask)
    # (where, not &: Triton's interpreter cannot 'and' a loaded scalar with a block)
    window = _window(buffer_ptr, chi2, tl.where(present, finite, False), c, cmask, C, row, M,
                     owner, ACC)
    v = tl.where(early, chi2, window)
    std = tl.sqrt(v + eps)
    running = tl.load(old_ptr + c, mask=cmask, other=1.0)  # running_var before this step
    ratio = std / tl.sqrt(running + eps)
    r = tl.where(t > renorm_after, tl.minimum(tl.maximum(ratio, 1.0 / rmax), rmax), 1.0)
    new_running = momentum * running + (1.0 - momentum) * v
    new_running = tl.where(tl.where(present, isfinite(new_running), False), new_running,
                           running)
    tl.store(running_var_ptr + c, new_running.to(running_var_ptr.dtype.element_ty),
             mask=cmask & owner)
    inv_std = 1.0 / std
    tl.store(saved_ptr + c, inv_std, mask=cmask & owner)
    tl.store(saved_ptr + C + c, r, mask=cmask & owner)
    first = owner & (tl.program_id(0) == 0)
    tl.store(saved_ptr + 2 * C, row.to(ACC), mask=first)
    tl.store(saved_ptr + 2 * C + 1, early.to(ACC), mask=first)
    weight = tl.load(weight_ptr + c, mask=cmask, other=0.0).to(ACC)
    bias = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(ACC)
    write_affine(x_ptr, y_ptr, (weight * r * inv_std)[:, None], bias[:, None], c, cmask, N, L,
                 stride_n, stride_c, stride_l, y_stride_n, y_stride_c, y_stride_l,
                 TILES_PER_CHUNK, ACC, BLOCK_L)


@triton.jit
def mabn_backward_kernel(dy_ptr, x_ptr, dx_ptr, weight_ptr, saved_ptr, buffer_ptr, flags_ptr,
                         dweight_ptr, dbias_ptr, partial_ptr, union_ptr, total_ptr,
                         N, C, L, stride_n, stride_c, stride_l, dy_stride_n, dy_stride_c,
                         dy_stride_l, dx_stride_n, dx_stride_c, dx_stride_l, CHUNKS,
                         TILES_PER_CHUNK, M, FROM_UNION: tl.constexpr, NEED_DX: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
    ACC: tl.constexpr = saved_ptr.dtype.element_ty
    c, cmask = channels(BLOCK_C, C)
    owner = tl.program_id(1) == 0
    dot = total(partial_ptr, 0, c, cmask, C, CHUNKS, ACC, BLOCK_C, BLOCK_K)
    dy_sum = total(partial_ptr, 1, c, cmask, C, CHUNKS, ACC, BLOCK_C, BLOCK_K)
    inv_std = tl.load(saved_ptr + c, mask=cmask, other=0.0)
    r = tl.load(saved_ptr + C + c, mask=cmask, other=0.0)
    row = tl.load(saved_ptr + 2 * C).to(tl.int64)
    early = tl.load(saved_ptr + 2 * C + 1) != 0
    weight = tl.load(weight_ptr + c, mask=cmask, other=0.0).to(ACC)
    coef = weight * r * inv_std
    if FROM_UNION:
        psi_t = coef * tl.load(union_ptr + c, mask=cmask, other=0.0)
        present = tl.load(total_ptr) > 0
    else:
        psi_t = coef * dot / element_count(N, L, ACC)
        present = True
    finite = isfinite(psi_t)
    note_nonfinite(flags_ptr, finite, cmask)
    window = _window(buffer_ptr, psi_t, tl.where(present, finite, False), c, cmask, C, row, M,
                     owner, ACC)
    psi = tl.where(early, psi_t, window)
    tl.store(dweight_ptr + c, (r * inv_std * dot).to(dweight_ptr.dtype.element_ty),
             mask=cmask & owner)
    tl.store(dbias_ptr + c, dy_sum.to(dbias_ptr.dtype.element_ty), mask=cmask & owner)
    if NEED_DX:
        zero = tl.zeros([BLOCK_C, 1], dtype=ACC)
        write_input_grad(x_ptr, dy_ptr, dx_ptr, coef[:, None], (psi * inv_std * inv_std)[:, None],
                         zero, zero, c, cmask, N, L, stride_n, stride_c, stride_l, dy_stride_n,
                         dy_stride_c, dy_stride_l, dx_stride_n, dx_stride_c, dx_stride_l,
                         TILES_PER_CHUNK, ACC, BLOCK_L)


def forward(x, weight, bias, running_var, buffer_x2, counter, flags, eps, momentum,
            warmup_iters, renorm_after, rmax, out_dtype, cdtype, sync):
    """(y, saved) for x (N, C, *): y of ``out_dtype`` laid out like x, and
    ``saved`` = [inv_std (C), r (C), row, early] in ``cdtype`` for
    :func:`backward`. Updates ``running_var``, ``buffer_x2`` and ``flags`` in
    place; two launches (and an all-reduce between them with ``sync``)."""
    view = channel_view(x)
    (n, c, length), strides = view.shape, view.strides
    plan = split(view.shape, strides, target_programs(x.device))
    y, y_strides = output_like(view, x, out_dtype)
    saved = x.new_empty(2 * c + 2, dtype=cdtype)
    partial, old = sum_partials(view, None, None, plan, SQUARES, cdtype, state=(running_var,))
    union = total_count = saved  # placeholders unless sync
    if sync:
        union, total_count = union_mean(partial[:, 0].sum(0), n * length)
    launch(mabn_forward_kernel, plan.grid(c), view.tensor, y, weight, bias, running_var, buffer_x2,
           counter, flags, saved, partial, old, union, total_count, n, c, length, *strides,
           *y_strides, plan.chunks, plan.tiles_per_chunk, buffer_x2.size(0), warmup_iters,
           renorm_after, float_bits(eps), float_bits(momentum), float_bits(rmax),
           FROM_UNION=sync, BLOCK_C=plan.block_c, BLOCK_L=plan.block_l, BLOCK_K=plan.block_k)
    return y, saved


def backward(dy, x, weight, saved, buffer_gz, flags, bias_dtype, sync, need_dx):
    """(dx, dweight, dbias) of :func:`forward` for the incoming ``dy``, dx
    laid out like x (empty unless ``need_dx``); writes psi_t into
    ``buffer_gz`` at the forward's row. Two launches."""
    b = start_backward(dy, x, weight, bias_dtype, need_dx, PRODUCTS, None, saved.dtype)
    (n, c, length), plan = b.x.shape, b.plan
    union = total_count = saved
    if sync:
        union, total_count = union_mean(b.partial[:, 0].sum(0), n * length)
    launch(mabn_backward_kernel, plan.grid(c), b.dy.tensor, b.x.tensor, b.dx, weight, saved,
           buffer_gz, flags, b.dweight, b.dbias, b.partial, union, total_count, n, c, length,
           *b.x.strides, *b.dy.strides, *b.dx_strides, plan.chunks, plan.tiles_per_chunk,
           buffer_gz.size(0), FROM_UNION=sync, NEED_DX=need_dx, BLOCK_C=plan.block_c,
           BLOCK_L=plan.block_l, BLOCK_K=plan.block_k)
    return b.dx, b.dweight, b.dbias


def variants():
    """(kernel, argument types, constants) of every kernel variant the layer
    launches (see :func:`mmnorm.layers.ahead_of_time.compile_ahead_of_time`)."""
    from ..shared.kernels import dtypes_and_tiles, signature
    for (x, param, buffer, stats), plan in dtypes_and_tiles():
        pointers = dict(x_ptr=x, y_ptr=x, dy_ptr=x, dx_ptr=x, weight_ptr=param, bias_ptr=param,
                        dweight_ptr=param, dbias_ptr=param, running_var_ptr=buffer,
                        buffer_ptr=buffer, t_ptr='i64', flags_ptr='i32', saved_ptr=stats,
                        partial_ptr=stats, old_ptr=stats, union_ptr=stats, total_ptr=stats)
        tiles = dict(BLOCK_C=plan.block_c, BLOCK_L=plan.block_l, BLOCK_K=plan.block_k)
        for from_union in (False, True):
            constants = dict(tiles, FROM_UNION=from_union)
            yield (mabn_forward_kernel, signature(mabn_forward_kernel, pointers, constants),
                   constants)
            for need_dx in (True, False):
                backward = dict(constants, NEED_DX=need_dx)
                yield (mabn_backward_kernel, signature(mabn_backward_kernel, pointers, backward),
                       backward)
