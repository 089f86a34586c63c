"""The fused path on what a GPU does and the interpreter does not: any stride
pattern, exact float64 arguments, grids that fill a GPU at detection shapes,
programs run in any order, no host read in any phase, the input's device, and
a way back to ATen when the kernels fail (through Triton's interpreter, as in
test_fused.py, whose helpers these tests use)."""
import contextlib
import copy
import itertools
import random
import warnings

import pytest
import torch
from torch import nn

from mmnorm import BRN, CBN, MABN
from mmnorm.layers import ahead_of_time, first_use, launching, paths
from mmnorm.layers.shared import kernels as shared_kernels

from test_fused import (
    CBN_CONFIG,
    FLOAT32,
    FailOnHostRead,
    assert_same_state,
    batches,
    cbn_batches,
    conv_cbn,
    kernels,
    layer,
    run_both,
    run_cbn_both,
    step,
)

pytestmark = pytest.mark.skipif(paths.triton_problem() is not None,
                                reason=f'the fused path needs Triton: {paths.triton_problem()}')

F64 = torch.float64
KINDS = ('MABN', 'BRN')


# ------------------------------------------------------------ any input
def views(case, kind_channels=6):
    """(make, description): ``make(base)`` turns a leaf ``base`` into the
    layer's input, and the base's shape."""
    c = kind_channels
    return {
        'channel_slice': ((2, c + 2, 3, 5), lambda b: b[:, :c]),
        'channel_slice_channels_last': ((2, c + 3, 4, 3),
                                        lambda b: b.contiguous(
                                            memory_format=torch.channels_last)[:, 1:c + 1]),
        'batch_slice': ((5, c, 3, 4), lambda b: b[::2]),
        'expanded_batch': ((1, c, 3, 3), lambda b: b.expand(3, c, 3, 3)),
        'as_strided': ((2 * c * 20,), lambda b: b.as_strided((2, c, 3, 4), (c * 20, 20, 5, 1))),
        'transposed_map': ((2, c, 4, 5), lambda b: b.transpose(2, 3)),
        '2d_slice': ((4, c + 1), lambda b: b[:, 1:]),
        '3d_slice': ((2, c * 2, 5), lambda b: b[:, ::2]),
        '5d_slice': ((2, c + 2, 2, 3, 2), lambda b: b[:, 2:]),
    }[case]


def strided_step(module, base, make, dy, mode):
    """A training step on ``make(base)`` as it is (not cloned): (y, dx of the
    base, parameter grads)."""
    module.zero_grad(set_to_none=True)
    base = base.clone().requires_grad_()
    with kernels(mode):
        y = module(make(base))
    y.backward(dy)
    return y.detach(), base.grad, {k: p.grad for k, p in module.named_parameters()}


CASES = ['channel_slice', 'channel_slice_channels_last', 'batch_slice', 'expanded_batch',
         'as_strided', 'transposed_map', '2d_slice', '3d_slice', '5d_slice']


@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('kind', [*KINDS, 'CBN'])
def test_any_stride_pattern_matches_aten(kind, case):
    shape, make = views(case)
    if kind == 'CBN':  # without compensation CBN reads no conv: any input of any rank
        torch.manual_seed(0)
        norm = CBN(6, **dict(CBN_CONFIG, rho=0.0))
    else:
        norm = layer(kind)
    reference = copy.deepcopy(norm)
    gen = torch.Generator().manual_seed(0)
    for i in range(5):
        base = torch.randn(shape, generator=gen) * (1 + i) + 0.5
        dy = torch.randn(make(base).shape, generator=gen)
        if i % 2:  # the incoming gradient in another layout than x
            dy = dy.transpose(-1, -2).contiguous().transpose(-1, -2)
        got = strided_step(norm, base, make, dy, 'triton')
        want = strided_step(reference, base, make, dy, 'aten')
        # (a permuted map: CBN's ATen step returns it contiguous, the fused one
        # keeps the input's layout, as MABN's and BRN's ATen steps do)
        if not (kind == 'CBN' and case == 'transposed_map'):
            assert got[0].stride() == want[0].stride(), (got[0].stride(), want[0].stride())
        for a, b in zip(got[:2], want[:2]):
            torch.testing.assert_close(a, b, **FLOAT32)
        for name, grad in got[2].items():
            torch.testing.assert_close(grad, want[2][name], msg=name, **FLOAT32)
        assert_same_state(norm, reference, FLOAT32)


# ---------------------------------------------------------- exact dtypes
@contextlib.contextmanager
def recorded_launches(run=True):
    """[(kernel name, grid, args)] of every launch meanwhile; the kernels run
    only if ``run``."""
    records = []
    original = launching.launch

    def record(kernel, grid, *args, **constants):
        records.append((kernel.__name__ if hasattr(kernel, '__name__') else kernel.fn.__name__,
                        tuple(grid), args))
        if run:
            original(kernel, grid, *args, **constants)

    modules = [shared_kernels] + [ahead_of_time.kernel_modules()[name]
                                  for name in ('mabn', 'brn', 'cbn')]
    with pytest.MonkeyPatch.context() as patch:
        for module in modules:
            patch.setattr(module, 'launch', record)
        yield records


@pytest.mark.parametrize('dtype', [torch.float32, F64])
def test_no_launch_takes_a_float_argument(dtype):
    # Triton types a Python float as fp32: a float64 kernel would compute with
    # a rounded eps. Every float reaches a kernel as float64 bits (an int).
    with recorded_launches() as records:
        for kind in KINDS:
            norm = layer(kind, dtype=dtype)
            for x, dy in batches((2, 6, 3, 3), steps=6, dtype=dtype):
                step(norm, x, dy, 'triton')
        model = conv_cbn(dtype=dtype, burnin=0)
        run_cbn_both(model, cbn_batches(model, steps=4, dtype=dtype),
                     dict(rtol=1e-10, atol=1e-10) if dtype == F64 else FLOAT32)
    assert records
    floats = [(name, arg) for name, _, args in records for arg in args if isinstance(arg, float)]
    assert not floats
    names = {name for name, _, _ in records}
    assert {'partial_sums_kernel', 'mabn_forward_kernel', 'mabn_backward_kernel',
            'brn_forward_kernel', 'normalized_backward_kernel', 'cbn_statistics_kernel',
            'cbn_output_kernel'} <= names


def test_ahead_of_time_variants_have_no_float_scalar():
    for name in ahead_of_time.KERNEL_MODULES:
        for kernel, types, _ in ahead_of_time.kernel_modules()[name].variants():
            scalars = {arg: kind for arg, kind in types.items()
                       if kind.startswith('fp') or kind.startswith('bf')}
            assert not scalars, (kernel.__name__, scalars)


def test_float_bits_round_trip_through_a_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def unpack(out_ptr, bits):
        tl.store(out_ptr, shared_kernels.as_float(bits, tl.float64))

    for value in (1e-5, 0.1, 1.0 / 3.0, 0.0, 2.5e-300, 3.0):
        out = torch.empty(1, dtype=F64)
        unpack[(1,)](out, shared_kernels.float_bits(value))
        assert out.item() == value  # exactly


# --------------------------------------------------- the whole GPU busy
DETECTION_SHAPES = {'res2': (2, 256, 200, 336), 'stem': (2, 64, 400, 672),
                    'fpn_p3': (2, 256, 100, 168), 'res5': (2, 2048, 25, 42),
                    'box_head': (512, 256, 7, 7), 'mask_head': (128, 256, 14, 14)}
ACTIVATION_KERNELS = {'partial_sums_kernel', 'mabn_forward_kernel', 'mabn_backward_kernel',
                      'brn_forward_kernel', 'normalized_backward_kernel', 'cbn_output_kernel'}
H200_PROGRAMS = 4 * 132


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('name', DETECTION_SHAPES)
def test_every_activation_launch_fills_an_h200(name, memory_format):
    shape = DETECTION_SHAPES[name]
    x = torch.empty(shape).contiguous(memory_format=memory_format).requires_grad_()
    dy = torch.empty(shape).contiguous(memory_format=memory_format)
    layers = [MABN(shape[1]), BRN(shape[1]), CBN(shape[1], rho=0.0, burnin=0)]
    with recorded_launches(run=False) as records, kernels('triton'):
        for norm in layers:
            norm(x).backward(dy)
    grids = {}
    for kernel, grid, _ in records:
        grids.setdefault(kernel, set()).add(grid)
    assert ACTIVATION_KERNELS <= set(grids)
    small = {kernel: grid for kernel in ACTIVATION_KERNELS for grid in grids[kernel]
             if grid[0] * grid[1] < H200_PROGRAMS}
    assert not small


def test_split_covers_every_tile_once():
    for n, c, length in itertools.product((1, 3, 512), (3, 64, 2048), (1, 49, 1050, 67200)):
        for strides in ((c * length, length, 1), (c * length, 1, c)):
            plan = shared_kernels.split((n, c, length), strides, H200_PROGRAMS)
            tiles = n * -(-length // plan.block_l)
            assert (plan.chunks - 1) * plan.tiles_per_chunk < tiles <= (
                plan.chunks * plan.tiles_per_chunk)
            assert plan.block_c * plan.block_l <= shared_kernels.MAX_TILE


# ---------------------------------------------- programs in any order
@contextlib.contextmanager
def programs_in_order(order):
    """Triton's interpreter runs a launch's programs in ``order`` ('reversed'
    or 'shuffled') instead of one after the other, as a GPU may."""
    from triton.runtime import interpreter
    builder = interpreter.interpreter_builder
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx
    pending = []
    moved = [0]

    def dim(nx, ny, nz):
        ids = list(itertools.product(range(nx), range(ny), range(nz)))
        if order == 'reversed':
            ids.reverse()
        else:
            random.Random(len(ids)).shuffle(ids)
        pending[:] = ids[::-1]
        set_dim(nx, ny, nz)

    def idx(x, y, z):
        program = pending.pop()
        moved[0] += program != (x, y, z)
        set_idx(*program)

    builder.set_grid_dim, builder.set_grid_idx = dim, idx
    try:
        yield moved
    finally:
        builder.set_grid_dim, builder.set_grid_idx = set_dim, set_idx


@pytest.mark.parametrize('order', ['reversed', 'shuffled'])
@pytest.mark.parametrize('kind', [*KINDS, 'CBN'])
def test_programs_in_any_order_give_the_same_step(kind, order):
    with programs_in_order(order) as moved:
        if kind == 'CBN':  # 70 channels: 3 channel blocks; 2 x 9 x 9 maps: several chunks
            model = conv_cbn(nn.Conv2d(4, 70, 3, padding=1, bias=False))
            run_cbn_both(model, cbn_batches(model, shape=(3, 4, 9, 9), steps=6), FLOAT32)
        else:
            run_both(layer(kind, channels=70), batches((3, 70, 5, 5), steps=6), FLOAT32)
    assert moved[0] > 0


# ----------------------------------------- every branch of every kernel
# MABN with buffer_size > warmup_iters (t <= m keeps it early after warm-up)
# and a spike then a shrink, so that r is clipped at rmax and at 1 / rmax.
MABN_BRANCHES = dict(buffer_size=4, warmup_iters=2, renorm_start_iter=3, rmax=1.5,
                     momentum=0.9)


def spike_then_shrink(shape, steps=10):
    data = batches(shape, steps=steps)
    scales = [1, 1, 1, 30, 30, 30, 0.01, 0.01, 0.01, 0.01]
    return [(x * scale, dy) for (x, dy), scale in zip(data, scales)]


@pytest.mark.parametrize('dtype', [torch.float32, F64])
def test_mabn_reaches_both_clips_of_r_and_the_early_rule(dtype):
    torch.manual_seed(0)
    norm = MABN(6, **MABN_BRANCHES).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    reference = copy.deepcopy(norm)
    r_values = []
    data = [(x.to(dtype), dy.to(dtype)) for x, dy in spike_then_shrink((2, 6, 3, 3))]
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else FLOAT32
    for x, dy in data:
        running = reference.running_var.clone()
        got, want = step(norm, x, dy, 'triton'), step(reference, x, dy, 'aten')
        for a, b in zip(got[:2], want[:2]):
            torch.testing.assert_close(a, b, **tolerance)
        for name, grad in got[2].items():  # bias.grad included
            torch.testing.assert_close(grad, want[2][name], msg=name, **tolerance)
        assert_same_state(norm, reference, tolerance)
        v = (reference.buffer_x2.mean(0) if int(reference.num_batches_tracked) > 4
             else x.double().square().mean((0, 2, 3)))
        r_values.append(((v + norm.eps).sqrt() / (running.double() + norm.eps).sqrt()))
    after = torch.stack(r_values[3:]).flatten()
    assert bool((after > 1.5).any()) and bool((after < 1 / 1.5).any())  # both clips bind


def test_cbn_gradual_burnin_longer_than_the_ring():
    # burnin=12 > k=3: the window grows 0 -> 3 and the age check drops old slots;
    # rho = 0.5 so that the compensation's factor shows
    model = conv_cbn(buffer_num=3, burnin=12, two_stage=False, rho=0.5)
    run_cbn_both(model, cbn_batches(model, steps=15), FLOAT32)
    model = conv_cbn(buffer_num=3, burnin=12, two_stage=False, rho=0.5, dtype=F64)
    run_cbn_both(model, cbn_batches(model, steps=15, dtype=F64), dict(rtol=1e-10, atol=1e-10))


# ---------------------------------------------------- no host read, ever
@pytest.mark.parametrize('kind', KINDS)
def test_fused_steps_read_nothing_on_the_host_through_every_phase(kind):
    norm = MABN(6, **MABN_BRANCHES) if kind == 'MABN' else BRN(
        6, warmup_iters=2, rmax_iters=5, dmax_iters=4)
    data = spike_then_shrink((2, 6, 3, 3))
    x = data[4][0].clone()
    x[1, 2, 0, 0] = float('inf')
    data[4] = (x, data[4][1])
    with kernels('triton'), FailOnHostRead():
        for x, dy in data:
            norm(x.requires_grad_()).backward(dy)
    assert int(norm.num_batches_tracked) == len(data)


# ------------------------------------------------------ the input's device
def test_launch_makes_the_inputs_device_current():
    guard = launching.device_guard(torch.device('cuda', 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(launching.device_guard(torch.device('cpu')), contextlib.nullcontext)


# ---------------------------------------------------------- a way back
@pytest.fixture
def fresh_checks(monkeypatch):
    """No variant checked yet in this process; afterwards the real record."""
    monkeypatch.setattr(first_use, 'CHECKED', {})
    yield


@contextlib.contextmanager
def auto_with_interpreter():
    """``auto`` as a GPU user has it, with the CPU standing in for the GPU."""
    paths.select('auto')
    paths._PATHS['cpu'] = True
    try:
        yield
    finally:
        paths.select()


def plain_step(module, x, dy):
    """One training step in the current mode: (y, dx, parameter grads...)."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    return (y.detach(), x.grad, *(p.grad for p in module.parameters()))


class Broken:
    """A kernel that fails to compile."""
    __name__ = 'broken'

    def __getitem__(self, grid):
        def fail(*args, **kwargs):
            raise RuntimeError('no C compiler to build the launcher')
        return fail


def test_a_failing_compile_raises_before_any_state_changes_in_triton_mode(fresh_checks,
                                                                          monkeypatch):
    monkeypatch.setattr(ahead_of_time.kernel_modules()['mabn'], 'mabn_forward_kernel', Broken())
    norm = layer('MABN')
    before = copy.deepcopy(norm.state_dict())
    with kernels('triton'), pytest.raises(RuntimeError, match='fused kernels failed on cpu'):
        norm(torch.randn(2, 6, 3, 3))
    for key, value in norm.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize('kind', [*KINDS, 'CBN'])
def test_a_failing_compile_sends_the_device_to_aten_in_auto_mode(kind, fresh_checks,
                                                                 monkeypatch):
    module = ahead_of_time.kernel_modules()['shared']
    monkeypatch.setattr(module, 'partial_sums_kernel', Broken())
    if kind == 'CBN':
        model = conv_cbn(burnin=0)
        data = cbn_batches(model, steps=3)
    else:
        model = layer(kind)
        data = batches((2, 6, 3, 3), steps=3)
    reference = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter('always')
        with auto_with_interpreter():
            for x, dy in data:
                got = plain_step(model, x, dy)
                with paths.aten_only():
                    want = plain_step(reference, x, dy)
                for a, b in zip(got, want):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)
            assert 'cpu' in paths.FAILED_DEVICES
    messages = [str(r.message) for r in records if 'fused Triton kernels failed' in str(r.message)]
    assert len(messages) == 1 and 'no C compiler' in messages[0]
    assert 'MMNORM_KERNELS=aten' in messages[0]
    assert_same_state(model, reference, dict(rtol=0, atol=0))


def test_a_wrong_kernel_result_sends_the_variant_to_aten_in_auto_mode(fresh_checks,
                                                                      monkeypatch):
    triton_mabn = ahead_of_time.kernel_modules()['mabn']
    forward = triton_mabn.forward

    def corrupted(*args):
        y, saved = forward(*args)
        return y + 1e-3, saved
    monkeypatch.setattr(triton_mabn, 'forward', corrupted)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), MABN(6))
    reference = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter('always')
        with auto_with_interpreter():
            for x, dy in batches((2, 3, 3, 3), steps=3):
                dy = dy[:, :1].expand(2, 6, 3, 3)
                got = plain_step(model, x, dy)
                with paths.aten_only():
                    want = plain_step(reference, x, dy)
                for a, b in zip(got, want):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)
    messages = [str(r.message) for r in records if 'differs from the ATen step' in str(r.message)]
    assert len(messages) == 1, messages
    assert "MABN '1'" in messages[0] and 'output' in messages[0] and '0.001' in messages[0]
    assert 'cpu' not in paths.FAILED_DEVICES
