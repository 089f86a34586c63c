"""What the fused kernels of MABN, BRN and CBN share: the (N, C, L) view of an
activation, how a launch splits it over programs, the partial sums, the
device functions and the backward of an affine normalization (BRN's and CBN's).

A direction of a training step is two launches over the same grid of
channel blocks x chunks (:func:`split`), so that a GPU gets at least
``4 x SMs`` programs at detection shapes:

1. :func:`partial_sums_kernel`: each program sums its channels over its chunk
   of the (N, L) tiles into ``partial[chunk, row, c]``; the chunk-0 programs
   also copy the state that the second launch both reads and writes
   (``old``), so that no program of the second launch reads a value another
   one has already overwritten.
2. the layer's kernel: every program of a channel block sums the partials in
   the same order (so all of them get the same statistics to the bit), does
   the (C,) bookkeeping in registers, and passes over its own chunk; only the
   chunk-0 program of a block writes the block's state.

No program waits for another or counts arrivals: the order in which a GPU runs
the programs of a launch does not matter. Float hyperparameters reach the
kernels as the bits of a float64 (:func:`float_bits`, :func:`as_float`), so a
float64 layer computes with its eps, momentum, ... in float64.
"""
import math
import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..launching import launch

MAX_TILE = 1024  # elements a program loads per loop step
MAX_CHANNELS_CONTIGUOUS = 32  # channel block when channels are the contiguous dim
PROGRAMS_PER_SM = 4
H200_SMS = 132  # the split's target where no GPU tells its own (Triton's interpreter)

# What partial_sums_kernel sums (constexpr SUMS), two rows per chunk:
SQUARES = tl.constexpr(0)   # [sum x^2, -]                       MABN's forward
MOMENTS = tl.constexpr(1)   # [sum (x - s), sum (x - s)^2], s = x[0, c, 0]   BRN's, CBN's
PRODUCTS = tl.constexpr(2)  # [sum dy x, sum dy]                 MABN's backward
CENTERED = tl.constexpr(3)  # [sum dy (x - mean), sum dy]         the normalized backward


def float_bits(value):
    """The float64 ``value`` as the int64 with its bits (a kernel argument that
    Triton does not round to float32; :func:`as_float` reads it)."""
    return struct.unpack('<q', struct.pack('<d', float(value)))[0]


@triton.jit
def as_float(bits, ACC: tl.constexpr):
    """The float that :func:`float_bits` packed, rounded once to ACC."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)


class ChannelView(NamedTuple):
    """A tensor (N, C, *) as the kernels read it: (N, C, L) with one stride
    per dim. ``tensor`` is what to pass (the trailing dims permuted by
    ``order``, or a copy of it where they do not collapse into one stride)."""
    tensor: torch.Tensor
    shape: tuple    # (N, C, L)
    strides: tuple  # (stride_n, stride_c, stride_l)
    order: tuple    # the trailing dims, outermost first


def _collapsed(t):
    """(N, C, L) strides of ``t`` if its trailing dims collapse into one, else None."""
    rest = [(size, stride) for size, stride in zip(t.shape[2:], t.stride()[2:]) if size != 1]
    if any(outer[1] != inner[1] * inner[0] for outer, inner in zip(rest, rest[1:])):
        return None
    return t.stride(0), t.stride(1), rest[-1][1] if rest else 1


def channel_view(t, order=None):
    """``t`` (N, C, *) seen as (N, C, L), L the product of the trailing dims
    taken in ``order`` (default: by ``t``'s strides, largest first, so a
    permuted layout needs no copy). Any strides of N and C are kept (slices,
    expanded batches); trailing dims that do not collapse are copied first.
    The reductions and elementwise passes do not depend on the order of the
    positions, only on x, y, dy and dx using the same one."""
    if order is None:
        order = tuple(sorted(range(2, t.dim()), key=lambda d: -t.stride(d)))
    permuted = t.permute(0, 1, *order)
    strides = _collapsed(permuted)
    if strides is None:
        permuted = permuted.contiguous()
        strides = _collapsed(permuted)
    shape = (t.size(0), t.size(1), math.prod(t.shape[2:]))
    return ChannelView(permuted, shape, strides, order)


def output_like(view, like, dtype=None):
    """(out, its (N, C, L) strides): an output for the input ``like`` (N, C,
    *) laid out as ``empty_like`` lays it, read in ``view``'s order; where
    that order does not collapse, dense in it instead."""
    out = torch.empty_like(like, dtype=dtype)
    strides = _collapsed(out.permute(0, 1, *view.order))
    if strides is None:
        dense = torch.empty(view.tensor.shape, dtype=out.dtype, device=out.device)
        out = dense.permute(0, 1, *(view.order.index(d) + 2 for d in range(2, like.dim())))
        strides = _collapsed(dense)
    return out, strides


def tile(channels, length, strides):
    """(BLOCK_C, BLOCK_L): the channel block of a program and the positions
    it loads per loop step, the contiguous dim the longer."""
    if length > 1 and strides[2] == 1:  # positions contiguous (NCHW)
        block_l = min(triton.next_power_of_2(length), MAX_TILE)
        return min(triton.next_power_of_2(channels), MAX_TILE // block_l), block_l
    block_c = min(triton.next_power_of_2(channels), MAX_CHANNELS_CONTIGUOUS)
    return block_c, min(triton.next_power_of_2(length), MAX_TILE // block_c)


def target_programs(device):
    """Programs a launch over an activation should start: 4 per SM of the
    device's GPU (of an H200 under the interpreter)."""
    if device.type == 'cuda':
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return PROGRAMS_PER_SM * H200_SMS


class Split(NamedTuple):
    """How the launches of a step cover an (N, C, L) activation."""
    block_c: int
    block_l: int
    chunks: int           # programs per channel block
    tiles_per_chunk: int  # (sample, BLOCK_L positions) tiles each chunk covers

    @property
    def block_k(self):
        """Chunks summed per loop step when partials are reduced."""
        return max(1, min(32, MAX_TILE // self.block_c))

    def grid(self, channels):
        return (triton.cdiv(channels, self.block_c), self.chunks)


def split(shape, strides, programs):
    """The :class:`Split` of an activation of (N, C, L) ``shape`` and
    ``strides`` that starts at least ``programs`` programs where it has that
    many tiles (fewer chunks otherwise: one tile per program)."""
    n, c, length = shape
    block_c, block_l = tile(c, length, strides)
    tiles = max(n * triton.cdiv(length, block_l), 1)
    wanted = min(tiles, triton.cdiv(programs, triton.cdiv(c, block_c)))
    per_chunk = tiles // wanted  # (rounded down: at least ``wanted`` chunks)
    return Split(block_c, block_l, triton.cdiv(tiles, per_chunk), per_chunk)


@triton.jit
def chunk_tiles(N, L, TILES_PER_CHUNK, BLOCK_L: tl.constexpr):
    """(first, last, tiles per sample): the tiles of this program's chunk
    (program_id(1)); tile i is sample i // tiles per sample, positions from
    (i % tiles per sample) * BLOCK_L."""
    per_sample = tl.cdiv(L, BLOCK_L)
    first = tl.program_id(1) * TILES_PER_CHUNK
    return first, tl.minimum(first + TILES_PER_CHUNK, N * per_sample), per_sample


@triton.jit
def tile_at(i, per_sample, channel, cmask, L, stride_n, stride_l, BLOCK_L: tl.constexpr):
    """(offsets, mask) of tile ``i`` (see :func:`chunk_tiles`) for the
    program's channels (``channel``: their offsets, [BLOCK_C, 1]; ``cmask``:
    which exist), in int64."""
    n = i // per_sample
    pos = (i % per_sample) * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    mask = cmask[:, None] & (pos < L)[None, :]
    return tl.cast(n, tl.int64) * stride_n + channel + pos[None, :] * stride_l, mask


@triton.jit
def channels(BLOCK_C: tl.constexpr, C):
    """(c, cmask): this program's channels (program_id(0)) and which exist."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    return c, c < C


@triton.jit
def partial_sums_kernel(x_ptr, dy_ptr, mean_ptr, partial_ptr, first_state_ptr, second_state_ptr,
                        old_ptr, N, C, L, stride_n, stride_c, stride_l, dy_stride_n,
                        dy_stride_c, dy_stride_l, TILES_PER_CHUNK, SUMS: tl.constexpr,
                        SNAPSHOT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """partial[chunk, 0 or 1, c]: the SUMS of this program's channels over its
    chunk (the first launch of a direction). The chunk-0 programs copy the
    first SNAPSHOT (0-2) state vectors into ``old[0 or 1, c]``."""
    ACC: tl.constexpr = partial_ptr.dtype.element_ty
    c, cmask = channels(BLOCK_C, C)
    channel = c.to(tl.int64)[:, None] * stride_c
    dy_channel = c.to(tl.int64)[:, None] * dy_stride_c
    if SUMS == MOMENTS:
        shift = tl.load(x_ptr + c.to(tl.int64) * stride_c, mask=cmask, other=0.0).to(ACC)[:, None]
    if SUMS == CENTERED:
        shift = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(ACC)[:, None]
    first = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
    second = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
    start, stop, per_sample = chunk_tiles(N, L, TILES_PER_CHUNK, BLOCK_L)
    for i in range(start, stop):
        offsets, mask = tile_at(i, per_sample, channel, cmask, L, stride_n, stride_l, BLOCK_L)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
        if SUMS == SQUARES:
            first += x * x
        elif SUMS == MOMENTS:
            x = tl.where(mask, x - shift, 0.0)
            first += x
            second += x * x
        else:
            dy_offsets, _ = tile_at(i, per_sample, dy_channel, cmask, L, dy_stride_n,
                                    dy_stride_l, BLOCK_L)
            dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(ACC)
            if SUMS == CENTERED:
                x = tl.where(mask, x - shift, 0.0)
            first += dy * x
            second += dy
    row = tl.program_id(1) * 2 * C + c
    tl.store(partial_ptr + row, tl.sum(first, 1), mask=cmask)
    if SUMS != SQUARES:
        tl.store(partial_ptr + row + C, tl.sum(second, 1), mask=cmask)
    owner = cmask & (tl.program_id(1) == 0)
    if SNAPSHOT >= 1:
        tl.store(old_ptr + c, tl.load(first_state_ptr + c, mask=owner, other=0.0).to(ACC),
                 mask=owner)
    if SNAPSHOT >= 2:
        tl.store(old_ptr + C + c, tl.load(second_state_ptr + c, mask=owner, other=0.0).to(ACC),
                 mask=owner)


@triton.jit
def element_count(N, L, ACC: tl.constexpr):
    """N * L as a float in ACC (rounded once, from int64)."""
    return (tl.cast(N, tl.int64) * L).to(tl.float64).to(ACC)


@triton.jit
def total(partial_ptr, row, c, cmask, C, CHUNKS, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
          BLOCK_K: tl.constexpr):
    """sum over chunks of partial[chunk, row, c], in a fixed order (every
    program that asks gets the same number)."""
    sums = tl.zeros([BLOCK_K, BLOCK_C], dtype=ACC)
    for start in range(0, CHUNKS, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        mask = (k < CHUNKS)[:, None] & cmask[None, :]
        sums += tl.load(partial_ptr + (k.to(tl.int64)[:, None] * 2 + row) * C + c[None, :],
                        mask=mask, other=0.0)
    return tl.sum(sums, 0)


@triton.jit
def moments(x_ptr, partial_ptr, c, cmask, C, stride_c, count, CHUNKS, ACC: tl.constexpr,
            BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """(mean, biased variance) from the MOMENTS partials over ``count``
    elements: sums of x - x[0, c, 0], no cancellation for data far from zero."""
    shift = tl.load(x_ptr + c.to(tl.int64) * stride_c, mask=cmask, other=0.0).to(ACC)
    shifted_mean = total(partial_ptr, 0, c, cmask, C, CHUNKS, ACC, BLOCK_C, BLOCK_K) / count
    squares = total(partial_ptr, 1, c, cmask, C, CHUNKS, ACC, BLOCK_C, BLOCK_K) / count
    return shift + shifted_mean, tl.maximum(squares - shifted_mean * shifted_mean, 0.0)


@triton.jit
def write_affine(x_ptr, y_ptr, scale, shift, c, cmask, N, L, stride_n, stride_c, stride_l,
                 y_stride_n, y_stride_c, y_stride_l, TILES_PER_CHUNK, ACC: tl.constexpr,
                 BLOCK_L: tl.constexpr):
    """y = x * scale + shift over this program's chunk (``scale``, ``shift``:
    [BLOCK_C, 1] in ACC), on y's own strides, stored in y's dtype."""
    channel = c.to(tl.int64)[:, None] * stride_c
    y_channel = c.to(tl.int64)[:, None] * y_stride_c
    start, stop, per_sample = chunk_tiles(N, L, TILES_PER_CHUNK, BLOCK_L)
    for i in range(start, stop):
        offsets, mask = tile_at(i, per_sample, channel, cmask, L, stride_n, stride_l, BLOCK_L)
        y_offsets, _ = tile_at(i, per_sample, y_channel, cmask, L, y_stride_n, y_stride_l,
                               BLOCK_L)
        value = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
        tl.store(y_ptr + y_offsets, (value * scale + shift).to(y_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def write_input_grad(x_ptr, dy_ptr, dx_ptr, dy_coef, x_coef, center, shift, c, cmask, N, L,
                     stride_n, stride_c, stride_l, dy_stride_n, dy_stride_c, dy_stride_l,
                     dx_stride_n, dx_stride_c, dx_stride_l, TILES_PER_CHUNK, ACC: tl.constexpr,
                     BLOCK_L: tl.constexpr):
    """dx = dy * dy_coef - (x - center) * x_coef + shift over this program's
    chunk (each [BLOCK_C, 1] in ACC), x, dy and dx on their own strides: a
    backward's elementwise pass."""
    channel = c.to(tl.int64)[:, None] * stride_c
    dy_channel = c.to(tl.int64)[:, None] * dy_stride_c
    dx_channel = c.to(tl.int64)[:, None] * dx_stride_c
    start, stop, per_sample = chunk_tiles(N, L, TILES_PER_CHUNK, BLOCK_L)
    for i in range(start, stop):
        offsets, mask = tile_at(i, per_sample, channel, cmask, L, stride_n, stride_l, BLOCK_L)
        dy_offsets, _ = tile_at(i, per_sample, dy_channel, cmask, L, dy_stride_n, dy_stride_l,
                                BLOCK_L)
        dx_offsets, _ = tile_at(i, per_sample, dx_channel, cmask, L, dx_stride_n, dx_stride_l,
                                BLOCK_L)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(ACC)
        tl.store(dx_ptr + dx_offsets, (dy * dy_coef - (x - center) * x_coef + shift).to(
            dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def isfinite(value):
    """True where ``value`` is neither inf nor NaN (inf - inf and NaN are NaN)."""
    return (value - value) == 0


@triton.jit
def note_nonfinite(flags_ptr, finite, channel_mask):
    """``flags[0] = 1`` if a channel of this program is not ``finite``."""
    bad = tl.sum(tl.where(channel_mask & (finite == 0), 1, 0), 0)
    tl.store(flags_ptr, 1, mask=bad > 0)


def sum_partials(x, dy, mean, plan, sums, dtype, state=()):
    """The first launch of a direction: (partial (chunks, 2, C), old (2, C))
    in ``dtype`` for :func:`partial_sums_kernel` over the :class:`ChannelView`
    ``x`` (and ``dy``, ``mean`` (C,) for CENTERED). ``state``: up to two (C,)
    buffers copied into ``old``."""
    (n, c, length), strides = x.shape, x.strides
    x = x.tensor
    partial = x.new_empty((plan.chunks, 2, c), dtype=dtype)
    old = x.new_empty((2, c) if state else (0,), dtype=dtype)
    first, second = (tuple(state) + (old, old))[:2]
    dy_tensor, dy_strides = (dy.tensor, dy.strides) if dy is not None else (x, strides)
    launch(partial_sums_kernel, plan.grid(c), x, dy_tensor, x if mean is None else mean,
           partial, first, second, old, n, c, length, *strides, *dy_strides,
           plan.tiles_per_chunk, SUMS=sums.value, SNAPSHOT=len(state), BLOCK_C=plan.block_c,
           BLOCK_L=plan.block_l)
    return partial, old


@triton.jit
def normalized_backward_kernel(dy_ptr, x_ptr, dx_ptr, weight_ptr, saved_ptr, partial_ptr,
                               dweight_ptr, dbias_ptr, N, C, L, stride_n, stride_c, stride_l,
                               dy_stride_n, dy_stride_c, dy_stride_l, dx_stride_n, dx_stride_c,
                               dx_stride_l, CHUNKS, TILES_PER_CHUNK, POOLED: tl.constexpr,
                               NEED_DX: tl.constexpr, BLOCK_C: tl.constexpr,
                               BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
    """The backward of y = weight * (r * x_hat + d) + bias, x_hat = (x - mean) *
    inv_std, with ``saved`` = [mean, inv_std, r, d] (+ [share] when POOLED),
    each (C,), from the CENTERED partials: dweight = r * sum(dy x_hat) + d *
    sum(dy), dbias = sum(dy) and

        dx = weight r inv_std (dy - share (mean(dy) + x_hat mean(dy x_hat))),

    where share (1 unless POOLED) is the batch's part in the statistics (1 /
    CBN's count of pooled steps)."""
    ACC: tl.constexpr = saved_ptr.dtype.element_ty
    c, cmask = channels(BLOCK_C, C)
    mean = tl.load(saved_ptr + c, mask=cmask, other=0.0)
    inv_std = tl.load(saved_ptr + C + c, mask=cmask, other=0.0)
    r = tl.load(saved_ptr + 2 * C + c, mask=cmask, other=0.0)
    d = tl.load(saved_ptr + 3 * C + c, mask=cmask, other=0.0)
    dy_xhat = total(partial_ptr, 0, c, cmask, C, CHUNKS, ACC, BLOCK_C, BLOCK_K) * inv_std
    dy_sum = total(partial_ptr, 1, c, cmask, C, CHUNKS, ACC, BLOCK_C, BLOCK_K)
    owner = cmask & (tl.program_id(1) == 0)
    tl.store(dweight_ptr + c, (r * dy_xhat + d * dy_sum).to(dweight_ptr.dtype.element_ty),
             mask=owner)
    tl.store(dbias_ptr + c, dy_sum.to(dbias_ptr.dtype.element_ty), mask=owner)
    if NEED_DX:
        if POOLED:
            share = tl.load(saved_ptr + 4 * C + c, mask=cmask, other=0.0)
            dy_sum *= share
            dy_xhat *= share
        count = element_count(N, L, ACC)
        weight = tl.load(weight_ptr + c, mask=cmask, other=0.0).to(ACC)
        gain = weight * r * inv_std
        x_coef = gain * inv_std * dy_xhat / count
        write_input_grad(x_ptr, dy_ptr, dx_ptr, gain[:, None], x_coef[:, None], mean[:, None],
                         (-gain * dy_sum / count)[:, None], c, cmask, N, L, stride_n, stride_c,
                         stride_l, dy_stride_n, dy_stride_c, dy_stride_l, dx_stride_n,
                         dx_stride_c, dx_stride_l, TILES_PER_CHUNK, ACC, BLOCK_L)


class Backward(NamedTuple):
    """What a backward's second launch takes (:func:`start_backward`)."""
    x: ChannelView
    dy: ChannelView
    plan: Split
    partial: torch.Tensor
    dx: torch.Tensor
    dx_strides: tuple
    dweight: torch.Tensor
    dbias: torch.Tensor


def start_backward(dy, x, weight, bias_dtype, need_dx, sums, mean, dtype):
    """A backward's first launch (the ``sums`` partials in ``dtype``, ``mean``
    for CENTERED) and its outputs: dx laid out like x (empty unless
    ``need_dx``), dweight and dbias."""
    view = channel_view(x)
    dy_view = channel_view(dy, view.order)
    plan = split(view.shape, view.strides, target_programs(x.device))
    partial, _ = sum_partials(view, dy_view, mean, plan, sums, dtype)
    dx, dx_strides = output_like(view, x) if need_dx else (x.new_empty(0), view.strides)
    return Backward(view, dy_view, plan, partial, dx, dx_strides, torch.empty_like(weight),
                    torch.empty_like(weight, dtype=bias_dtype))


def normalized_backward(dy, x, weight, saved, bias_dtype, need_dx, pooled):
    """(dx, dweight, dbias) of :func:`normalized_backward_kernel`; dx laid out
    like x, empty unless ``need_dx``. Two launches."""
    b = start_backward(dy, x, weight, bias_dtype, need_dx, CENTERED, saved, saved.dtype)
    (n, c, length), plan = b.x.shape, b.plan
    launch(normalized_backward_kernel, plan.grid(c), b.dy.tensor, b.x.tensor, b.dx, weight,
           saved, b.partial, b.dweight, b.dbias, n, c, length, *b.x.strides, *b.dy.strides,
           *b.dx_strides, plan.chunks, plan.tiles_per_chunk, POOLED=pooled, NEED_DX=need_dx,
           BLOCK_C=plan.block_c, BLOCK_L=plan.block_l, BLOCK_K=plan.block_k)
    return b.dx, b.dweight, b.dbias


# -------------------------------------------------- ahead-of-time compiling
# (activation, parameters, buffers, statistics): the dtype sets a layer meets
# (float32; half activations of a float32 or half module; float64).
DTYPES = [('fp32', 'fp32', 'fp32', 'fp32'), ('bf16', 'fp32', 'fp32', 'fp32'),
          ('fp16', 'fp16', 'fp32', 'fp32'), ('bf16', 'bf16', 'fp32', 'fp32'),
          ('fp64', 'fp64', 'fp64', 'fp64')]
# (BLOCK_C, BLOCK_L) that tile() gives: NCHW with large maps, small maps, channels_last.
TILES = [(1, 1024), (64, 16), (32, 32)]


def dtypes_and_tiles():
    """The (dtypes, Split) pairs compiled ahead of time: every tile in float32,
    every dtype set with the first tile (the two choices are independent)."""
    return ([(DTYPES[0], Split(*tile, 1, 1)) for tile in TILES]
            + [(dtypes, Split(*TILES[0], 1, 1)) for dtypes in DTYPES[1:]])


def signature(kernel, pointers, constants):
    """The argument types of ``kernel`` for ``triton.compile``: pointers to the
    element types of ``pointers`` (argument name -> 'fp32' ...), 'constexpr'
    for ``constants``, i64 for the float bits (``*_bits``) and i32 for the
    other integers. No argument is a float: see :func:`float_bits`."""
    types = {}
    for name in kernel.arg_names:
        if name in constants:
            types[name] = 'constexpr'
        elif name in pointers:
            types[name] = '*' + pointers[name]
        else:
            types[name] = 'i64' if name.endswith('_bits') else 'i32'
    return types


def variants():
    """(kernel, argument types, constants) of every variant of the shared
    kernels (see :func:`mmnorm.layers.ahead_of_time.compile_ahead_of_time`)."""
    for (x, param, buffer, stats), plan in dtypes_and_tiles():
        pointers = dict(dy_ptr=x, x_ptr=x, dx_ptr=x, weight_ptr=param, dweight_ptr=param,
                        dbias_ptr=param, saved_ptr=stats, mean_ptr=stats, partial_ptr=stats,
                        old_ptr=stats, first_state_ptr=buffer, second_state_ptr=buffer)
        tiles = dict(BLOCK_C=plan.block_c, BLOCK_L=plan.block_l)
        for sums, snapshot in ((SQUARES, 1), (MOMENTS, 2), (MOMENTS, 0), (PRODUCTS, 0),
                               (CENTERED, 0)):
            constants = dict(tiles, SUMS=sums.value, SNAPSHOT=snapshot)
            yield (partial_sums_kernel, signature(partial_sums_kernel, pointers, constants),
                   constants)
        for pooled in (False, True):
            for need_dx in (True, False):
                constants = dict(tiles, POOLED=pooled, NEED_DX=need_dx, BLOCK_K=plan.block_k)
                yield (normalized_backward_kernel,
                       signature(normalized_backward_kernel, pointers, constants), constants)
