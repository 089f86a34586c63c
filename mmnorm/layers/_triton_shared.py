"""What the fused kernels of MABN, BRN and CBN share: the (N, C, L) view of an
activation, the tile sizes, the device functions and the backward of an
affine normalization (BRN's and CBN's).

One program handles BLOCK_C channels over the whole batch: it reduces over
(N, L), does the channels' (C,) bookkeeping in registers, and makes the
elementwise pass, so a training step is one launch per direction. The step
counter is advanced by the layer before the launch; the only state shared
between programs is the non-finite flag and, for CBN, what the last program
to arrive writes (:func:`last_to_arrive`).
"""
import math

import torch
import triton
import triton.language as tl

from ._kernels import launch

MAX_TILE = 1024  # elements a program loads per loop step
MAX_CHANNELS_CONTIGUOUS = 32  # channel block when channels are the contiguous dim


def channel_view(x):
    """``x`` (N, C, *) seen as (N, C, L), L the product of the trailing dims:
    ``(x, (N, C, L), (stride_n, stride_c, stride_l))``. The trailing dims of a
    contiguous or channels_last tensor collapse with one stride; anything else
    is first made contiguous."""
    rest = [(size, stride) for size, stride in zip(x.shape[2:], x.stride()[2:]) if size != 1]
    if any(outer[1] != inner[1] * inner[0] for outer, inner in zip(rest, rest[1:])):
        x = x.contiguous()
        rest = [(size, stride) for size, stride in zip(x.shape[2:], x.stride()[2:]) if size != 1]
    length = math.prod(x.shape[2:])
    stride_l = rest[-1][1] if rest else 1
    return x, (x.size(0), x.size(1), length), (x.stride(0), x.stride(1), stride_l)


def tile(channels, length, strides):
    """(BLOCK_C, BLOCK_L): the channel block of a program and the positions
    it loads per loop step, the contiguous dim the longer."""
    if length > 1 and strides[2] == 1:  # positions contiguous (NCHW)
        block_l = min(triton.next_power_of_2(length), MAX_TILE)
        return min(triton.next_power_of_2(channels), MAX_TILE // block_l), block_l
    block_c = min(triton.next_power_of_2(channels), MAX_CHANNELS_CONTIGUOUS)
    return block_c, min(triton.next_power_of_2(length), MAX_TILE // block_c)


@triton.jit
def tile_at(n, start, channel, cmask, L, stride_n, stride_l, BLOCK_L: tl.constexpr):
    """(offsets, mask) of the tile of sample ``n`` at positions ``start`` ..
    ``start + BLOCK_L`` for the program's channels (``channel``: their
    offsets, [BLOCK_C, 1]; ``cmask``: which exist), in int64."""
    pos = start + tl.arange(0, BLOCK_L).to(tl.int64)
    mask = cmask[:, None] & (pos < L)[None, :]
    return tl.cast(n, tl.int64) * stride_n + channel + pos[None, :] * stride_l, mask


@triton.jit
def load_x_and_dy(x_ptr, dy_ptr, n, start, channel, dy_channel, cmask, L, stride_n, stride_l,
                  dy_stride_n, dy_stride_l, ACC: tl.constexpr, BLOCK_L: tl.constexpr):
    """(x, dy, offsets of x, mask): the tiles of x and of its gradient dy (on
    dy's own strides; ``dy_channel`` its channel offsets) of sample ``n`` at
    positions ``start`` .. ``start + BLOCK_L``, in ACC, 0 where masked."""
    offsets, mask = tile_at(n, start, channel, cmask, L, stride_n, stride_l, BLOCK_L)
    dy_offsets, _ = tile_at(n, start, dy_channel, cmask, L, dy_stride_n, dy_stride_l, BLOCK_L)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(ACC)
    return x, dy, offsets, mask


@triton.jit
def shifted_moments(x_ptr, c, cmask, N, L, stride_n, stride_c, stride_l, inv_count,
                    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """(mean, biased variance) of channels ``c`` over (N, L), in ACC, from
    sums of x - x[0, c, 0]: no cancellation for data far from zero."""
    channel = c.to(tl.int64)[:, None] * stride_c
    shift_point = tl.load(x_ptr + c.to(tl.int64) * stride_c, mask=cmask, other=0.0).to(ACC)
    sums = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
    squares = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
    for n in range(0, N):
        for start in range(0, L, BLOCK_L):
            offsets, mask = tile_at(n, start, channel, cmask, L, stride_n, stride_l, BLOCK_L)
            value = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
            value = tl.where(mask, value - shift_point[:, None], 0.0)
            sums += value
            squares += value * value
    shifted_mean = tl.sum(sums, 1) * inv_count
    var = tl.maximum(tl.sum(squares, 1) * inv_count - shifted_mean * shifted_mean, 0.0)
    return shift_point + shifted_mean, var


@triton.jit
def write_affine(x_ptr, y_ptr, scale, shift, channel, cmask, N, L, stride_n, stride_l,
                 ACC: tl.constexpr, BLOCK_L: tl.constexpr):
    """y = x * scale + shift over (N, L) for the program's channels (``scale``,
    ``shift``: [BLOCK_C, 1] in ACC), stored in y's dtype: a forward's
    elementwise pass."""
    for n in range(0, N):
        for start in range(0, L, BLOCK_L):
            offsets, mask = tile_at(n, start, channel, cmask, L, stride_n, stride_l, BLOCK_L)
            value = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
            tl.store(y_ptr + offsets, (value * scale + shift).to(y_ptr.dtype.element_ty),
                     mask=mask)


@triton.jit
def isfinite(value):
    """True where ``value`` is neither inf nor NaN (inf - inf and NaN are NaN)."""
    return (value - value) == 0


@triton.jit
def note_nonfinite(flags_ptr, finite, channel_mask):
    """``flags[0] = 1`` if a channel of this program is not ``finite``."""
    bad = tl.sum(tl.where(channel_mask & (finite == 0), 1, 0), 0)
    tl.store(flags_ptr, 1, mask=bad > 0)


@triton.jit
def last_to_arrive(flags_ptr):
    """True in the last program to call this: each program arrives at
    ``flags[1]`` (after everything it read before), the last one resets the
    arrivals to 0. What every program reads can be overwritten by the last."""
    arrived = tl.atomic_add(flags_ptr + 1, 1)
    last = arrived == tl.num_programs(0) - 1
    tl.store(flags_ptr + 1, 0, mask=last)
    return last


@triton.jit
def normalized_backward_kernel(dy_ptr, x_ptr, dx_ptr, weight_ptr, saved_ptr, dweight_ptr,
                               dbias_ptr, N, C, L, stride_n, stride_c, stride_l, dy_stride_n,
                               dy_stride_c, dy_stride_l, inv_count, POOLED: tl.constexpr,
                               NEED_DX: tl.constexpr, BLOCK_C: tl.constexpr,
                               BLOCK_L: tl.constexpr):
    """The backward of y = weight * (r * x_hat + d) + bias, x_hat = (x - mean) *
    inv_std, with ``saved`` = [mean, inv_std, r, d] (+ [share] when POOLED),
    each (C,): dweight = r * sum(dy x_hat) + d * sum(dy), dbias = sum(dy) and

        dx = weight r inv_std (dy - share (mean(dy) + x_hat mean(dy x_hat))),

    where share (1 unless POOLED) is the batch's part in the statistics (1 /
    CBN's count of pooled steps). One reduction and one elementwise pass."""
    ACC: tl.constexpr = saved_ptr.dtype.element_ty
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    channel = c.to(tl.int64)[:, None] * stride_c
    dy_channel = c.to(tl.int64)[:, None] * dy_stride_c
    mean = tl.load(saved_ptr + c, mask=cmask, other=0.0)[:, None]
    inv_std = tl.load(saved_ptr + C + c, mask=cmask, other=0.0)
    r = tl.load(saved_ptr + 2 * C + c, mask=cmask, other=0.0)
    d = tl.load(saved_ptr + 3 * C + c, mask=cmask, other=0.0)
    grads = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
    products = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
    for n in range(0, N):
        for start in range(0, L, BLOCK_L):
            x, dy, _, mask = load_x_and_dy(x_ptr, dy_ptr, n, start, channel, dy_channel, cmask,
                                           L, stride_n, stride_l, dy_stride_n, dy_stride_l, ACC,
                                           BLOCK_L)
            grads += dy
            products += tl.where(mask, dy * (x - mean), 0.0)
    dy_sum = tl.sum(grads, 1)
    dy_xhat = tl.sum(products, 1) * inv_std
    tl.store(dweight_ptr + c, (r * dy_xhat + d * dy_sum).to(dweight_ptr.dtype.element_ty),
             mask=cmask)
    tl.store(dbias_ptr + c, dy_sum.to(dbias_ptr.dtype.element_ty), mask=cmask)
    if NEED_DX:
        if POOLED:
            share = tl.load(saved_ptr + 4 * C + c, mask=cmask, other=0.0)
            dy_sum *= share
            dy_xhat *= share
        weight = tl.load(weight_ptr + c, mask=cmask, other=0.0).to(ACC)
        gain = (weight * r * inv_std)[:, None]
        mean_dy = (dy_sum * inv_count)[:, None]
        xhat_coef = (dy_xhat * inv_count)[:, None]
        inv_std = inv_std[:, None]
        for n in range(0, N):
            for start in range(0, L, BLOCK_L):
                x, dy, offsets, mask = load_x_and_dy(x_ptr, dy_ptr, n, start, channel, dy_channel,
                                                     cmask, L, stride_n, stride_l, dy_stride_n,
                                                     dy_stride_l, ACC, BLOCK_L)
                xhat = (x - mean) * inv_std
                tl.store(dx_ptr + offsets, (gain * (dy - mean_dy - xhat * xhat_coef)).to(
                    dx_ptr.dtype.element_ty), mask=mask)


def normalized_backward(dy, x, weight, saved, bias_dtype, need_dx, pooled):
    """(dx, dweight, dbias) of :func:`normalized_backward_kernel`; dx laid out
    like x, empty unless ``need_dx``. One launch."""
    x, (n, c, length), strides = channel_view(x)
    dy, _, dy_strides = channel_view(dy)
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    dweight = torch.empty_like(weight)
    dbias = torch.empty_like(weight, dtype=bias_dtype)
    block_c, block_l = tile(c, length, strides)
    launch(normalized_backward_kernel, (triton.cdiv(c, block_c),), dy, x, dx, weight, saved,
           dweight, dbias, n, c, length, *strides, *dy_strides, 1.0 / max(n * length, 1),
           POOLED=pooled, NEED_DX=need_dx, BLOCK_C=block_c, BLOCK_L=block_l)
    return dx, dweight, dbias


# -------------------------------------------------- ahead-of-time compiling
FLOAT_ARGUMENTS = ('eps', 'momentum', 'rmax', 'dmax', 'inv_count')
# (activation, parameters, buffers, statistics): the dtype sets a layer meets
# (float32; half activations of a float32 or half module; float64).
DTYPES = [('fp32', 'fp32', 'fp32', 'fp32'), ('bf16', 'fp32', 'fp32', 'fp32'),
          ('fp16', 'fp16', 'fp32', 'fp32'), ('bf16', 'bf16', 'fp32', 'fp32'),
          ('fp64', 'fp64', 'fp64', 'fp64')]
# (BLOCK_C, BLOCK_L) that tile() gives: NCHW with large maps, small maps, channels_last.
TILES = [(1, 1024), (64, 16), (32, 32)]


def dtypes_and_tiles():
    """The (dtypes, tile) pairs compiled ahead of time: every tile in float32,
    every dtype set with the first tile (the two choices are independent)."""
    return [(DTYPES[0], tile) for tile in TILES] + [(dtypes, TILES[0]) for dtypes in DTYPES[1:]]


def signature(kernel, pointers, constants):
    """The argument types of ``kernel`` for ``triton.compile``: pointers to the
    element types of ``pointers`` (argument name -> 'fp32' ...), 'constexpr'
    for ``constants``, fp32 for the float scalars and i32 for the rest."""
    types = {}
    for name in kernel.arg_names:
        if name in constants:
            types[name] = 'constexpr'
        elif name in pointers:
            types[name] = '*' + pointers[name]
        else:
            types[name] = 'fp32' if name in FLOAT_ARGUMENTS else 'i32'
    return types


def variants():
    """(kernel, argument types, constants) of every variant of the shared
    backward kernel (see :func:`mmnorm.layers._kernels.compile_ahead_of_time`)."""
    for (x, param, _, stats), (block_c, block_l) in dtypes_and_tiles():
        pointers = dict(dy_ptr=x, x_ptr=x, dx_ptr=x, weight_ptr=param, dweight_ptr=param,
                        dbias_ptr=param, saved_ptr=stats)
        for pooled in (False, True):
            for need_dx in (True, False):
                constants = dict(POOLED=pooled, NEED_DX=need_dx, BLOCK_C=block_c,
                                 BLOCK_L=block_l)
                yield (normalized_backward_kernel,
                       signature(normalized_backward_kernel, pointers, constants), constants)
