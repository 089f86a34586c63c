"""What the fused kernels of MABN and BRN share: the (N, C, L) view of an
activation, the tile sizes, and three device functions.

One program handles BLOCK_C channels over the whole batch: it reduces over
(N, L), does the channels' (C,) bookkeeping in registers, and makes the
elementwise pass, so a training step is one launch per direction. The only
state shared between programs is the step counter (:func:`advance_counter`)
and the non-finite flag.
"""
import math

import triton
import triton.language as tl

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
def isfinite(value):
    """True where ``value`` is neither inf nor NaN (inf - inf and NaN are NaN)."""
    return (value - value) == 0


@triton.jit
def note_nonfinite(flags_ptr, finite, channel_mask):
    """``flags[0] = 1`` if a channel of this program is not ``finite``."""
    bad = tl.sum(tl.where(channel_mask & (finite == 0), 1, 0), 0)
    tl.store(flags_ptr, 1, mask=bad > 0)


@triton.jit
def advance_counter(t_ptr, flags_ptr, t):
    """Store the step counter ``t`` (read by every program before) once all
    programs have read it: each program arrives at ``flags[1]``, the last one
    writes ``t`` and resets the arrivals to 0."""
    programs = tl.num_programs(0)
    arrived = tl.atomic_add(flags_ptr + 1, 1)
    last = arrived == programs - 1
    tl.store(t_ptr, t, mask=last)
    tl.store(flags_ptr + 1, 0, mask=last)


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
