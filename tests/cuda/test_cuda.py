"""The layers on an NVIDIA GPU: MABN (behind a CenConv), CBN (behind an
nn.Conv2d), BRN (behind an nn.Conv2d) and WSConv (+ GroupNorm).

Run with ``python -m pytest -m cuda tests/cuda`` on a machine with a GPU; the
whole file is sized to take well under 90 s on an H100 (small shapes, tens of
steps, two compiled models). Without a GPU every test is skipped (see
:func:`device`), and ``MMNORM_CUDA_TESTS_ON_CPU=1`` runs the same code on the
CPU, to check the tests themselves.

Every subject is a small ``nn.Sequential(conv, norm)``, built in float32 on the
CPU from a fixed seed, and trained with plain SGD on a linear loss
``sum(y * dy)``: each step's x and dy are drawn on the CPU in float64 and
rounded to float32, so a float64 twin sees exactly the same numbers.
"""
import copy
import datetime
import io
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mmnorm.layers import BRN, CBN, MABN, CenConv, WSConv

from conftest import NO_CPU_FLOAT16_AUTOCAST, exit_without_teardown, free_port

pytestmark = pytest.mark.cuda

CPU_ENV = 'MMNORM_CUDA_TESTS_ON_CPU'
NO_CUDA = 'no CUDA device: these tests need an NVIDIA GPU (run: bash tools/gpu_check.sh)'


@pytest.fixture(scope='session')
def device():
    """torch.device('cuda'); the CPU with MMNORM_CUDA_TESTS_ON_CPU=1 (to check
    the tests' code on a machine without a GPU); else the test is skipped."""
    if torch.cuda.is_available():
        return torch.device('cuda')
    if os.environ.get(CPU_ENV) == '1':
        return torch.device('cpu')
    pytest.skip(NO_CUDA)


@pytest.fixture(autouse=True)
def _needs_device(device):
    """Every test here is skipped with NO_CUDA where ``device`` is."""

F32, F64 = torch.float32, torch.float64
CPU = torch.device('cpu')
C_IN, C = 3, 8
SHAPE = (2, C_IN, 12, 12)  # two images per batch: the small-batch regime
LR = 0.02

KINDS = ('MABN', 'CBN', 'BRN', 'WSConv')
NORMS = ('MABN', 'CBN', 'BRN')

# Schedules short enough to be crossed within the tests' steps. MABN: the
# window (4 rows) is full after t = 4, batch statistics are used while t < 8,
# r leaves 1 after t = 12. BRN: plain BN while t <= 5, then the bounds of d
# and r open up to dmax at t = 15 and rmax at t = 20. CBN: no burn-in, the
# window of 3 past steps fills over the first 3 steps, rho = 1.
LAYER_CFG = dict(
    MABN=dict(buffer_size=4, warmup_iters=8, renorm_start_iter=12),
    CBN=dict(buffer_num=3, rho=1.0),
    BRN=dict(warmup_iters=5, rmax_iters=20, dmax_iters=15),
    WSConv={},
)

# ---------------------------------------------------------------- tolerances
# A tolerance here is a relative error r: elementwise
#     |actual - expected| <= r * (|expected| + scale),
# scale being the largest |expected| of the tensor or of its group (all
# parameter gradients of a step, all parameters of a state dict). The group
# matters for numbers that are 0 in exact arithmetic: the gradient of the bias
# of a conv in front of BRN is float32 noise of 1e-5 beside gradients of 100.
#
# float32 on the device against float64 on the CPU, over 50 SGD steps: float32
# rounds at 6e-8; each step's statistics (sums over 288 numbers per channel)
# and normalisation lose a few more digits, and SGD carries the difference in
# the gradients into the weights of the later steps. Measured with float32 on
# the CPU against float64 (these models, these 50 steps): 2e-6 at most, for
# every output, gradient and state-dict entry. CUDA's kernels sum in other
# orders, not more coarsely: 1e-4 leaves a margin of 50. All of this needs
# TF32 off (10 mantissa bits: conv outputs would differ by 1e-3), which every
# test that compares numbers does (the no_tf32 fixture).
FP32_VS_FP64 = 1e-4
# float32 against float32, where only the order of the arithmetic differs
# (the other device, channels_last, cuDNN off, inductor's fused kernels,
# NCCL): each side is within 2e-6 of the exact value, as above.
FP32_VS_FP32 = 1e-4
EXACT = 0.0

NO_SYNC_DEBUG_ON_CPU = 'torch.cuda.set_sync_debug_mode exists only on CUDA'
NO_CUDNN_ON_CPU = 'cuDNN exists only on CUDA: the CPU run is the same with it on or off'


# ------------------------------------------------------------------ subjects
def mabn(**cfg):
    return nn.Sequential(CenConv(C_IN, C, 3, padding=1), MABN(C, **cfg))


def cbn(**cfg):
    return nn.Sequential(nn.Conv2d(C_IN, C, 3, padding=1), CBN(C, **cfg))


def brn(**cfg):
    return nn.Sequential(nn.Conv2d(C_IN, C, 3, padding=1), BRN(C, **cfg))


def wsconv():
    return nn.Sequential(WSConv(C_IN, C, 3, padding=1), nn.GroupNorm(2, C))


FACTORIES = dict(MABN=mabn, CBN=cbn, BRN=brn, WSConv=wsconv)


def build(kind, **overrides):
    """conv -> norm for ``kind`` (its LAYER_CFG, updated by ``overrides``) in
    float32 on the CPU, the same weights for a given kind; the norm's affine
    parameters away from (1, 0)."""
    torch.manual_seed(0)
    model = FACTORIES[kind](**dict(LAYER_CFG[kind], **overrides))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    return model


def batch(step, seed=0, shape=SHAPE, scale=1.5, offset=0.5):
    """(x, dy) of ``step`` in float32 on the CPU: drawn in float64, rounded."""
    gen = torch.Generator().manual_seed(10_000 * seed + step)
    x = torch.randn(shape, generator=gen, dtype=F64) * scale + offset
    dy = torch.randn((shape[0], C) + tuple(shape[2:]), generator=gen, dtype=F64)
    return x.float(), dy.float()


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR)


@dataclass
class Step:
    """What a training step returns: the output, the input gradient and the
    parameter gradients by name (all detached)."""
    y: torch.Tensor
    dx: torch.Tensor
    grads: dict


def train_step(model, optimizer, x, dy, memory_format=None, forward=None, view=None):
    """Forward (through ``forward``, e.g. the compiled ``model``, if given) of
    ``x`` (or of ``view(x)``: a slice of it; dx is then x's gradient),
    backward of sum(y * dy), then the optimizer's step (if any). Nothing here
    reads a device value on the host."""
    x = x.detach().clone()
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    x.requires_grad_()
    y = (forward or model)(x if view is None else view(x))
    y.backward(dy.to(y.dtype))
    step = Step(y.detach(), x.grad,
                {name: p.grad.detach().clone() for name, p in model.named_parameters()})
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)
    return step


def train(model, optimizer, steps, device):
    """Train on the batches of ``steps`` (step numbers); returns the Steps."""
    return [train_step(model, optimizer, *(t.to(device) for t in batch(step)))
            for step in steps]


# ---------------------------------------------------------------- comparing
def largest(tensors):
    """The largest |value| in ``tensors`` (0 for none or empty ones)."""
    return max((float(t.detach().abs().max()) for t in tensors if t.numel()), default=0.0)


def assert_close(actual, expected, tol, what, scale=0.0):
    """``actual`` within ``tol`` of ``expected`` (see the tolerances above),
    compared in float64 on the CPU."""
    actual, expected = (t.detach().to(CPU, F64) for t in (actual, expected))
    scale = max(scale, largest([expected]))
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale,
                               msg=lambda message: f'{what}: {message}')


def assert_steps_close(actual, expected, tol, what):
    assert_close(actual.y, expected.y, tol, f'{what}: output')
    assert_close(actual.dx, expected.dx, tol, f'{what}: input gradient')
    assert actual.grads.keys() == expected.grads.keys()
    scale = largest(expected.grads.values())
    for name, grad in expected.grads.items():
        assert_close(actual.grads[name], grad, tol, f'{what}: gradient of {name}', scale)


def is_parameter(key):
    return key.rsplit('.', 1)[-1] in ('weight', 'bias')


def assert_states_close(actual, expected, tol, what):
    """Every entry of two state dicts: floats within ``tol`` (parameters
    against the largest parameter), integers equal."""
    assert actual.keys() == expected.keys(), what
    scale = largest([v for k, v in expected.items() if is_parameter(k)])
    for key, want in expected.items():
        got = actual[key]
        assert got.shape == want.shape, f'{what}: {key} {tuple(got.shape)} != {tuple(want.shape)}'
        if want.is_floating_point():
            assert_close(got, want, tol, f'{what}: {key}', scale if is_parameter(key) else 0.0)
        else:
            assert torch.equal(got.cpu(), want.cpu()), f'{what}: {key} {got} != {want}'


def statistic_buffers(model):
    """The floating-point buffers of the norm in ``model`` (none for GroupNorm),
    read without saving a state dict (which reads the non-finite flag)."""
    return {name: value for name, value in model[1].named_buffers()
            if value.is_floating_point()}


def nonfinite_warnings(records):
    return [w for w in records
            if issubclass(w.category, RuntimeWarning) and 'inf or NaN' in str(w.message)]


# ----------------------------------------------------------------- fixtures
@pytest.fixture
def no_tf32():
    """Full float32 convolutions and matmuls for this test, restored after."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@contextmanager
def cudnn_enabled(enabled):
    """Only torch.backends.cudnn.enabled (``cudnn.flags`` would also reset allow_tf32)."""
    before = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = before


# ------------------------------------------- 1. against a float64 reference
STEPS = 50
STATE_CHECKS = (1, 4, 6, 8, 13, 16, 25, STEPS)  # around the schedules' turning points


@pytest.mark.parametrize('kind', KINDS)
def test_50_steps_match_a_float64_cpu_reference(kind, device, no_tf32):
    model = build(kind)
    reference = copy.deepcopy(model).double()
    model.to(device)
    optimizer, ref_optimizer = sgd(model), sgd(reference)
    for step in range(1, STEPS + 1):
        x, dy = batch(step)
        got = train_step(model, optimizer, x.to(device), dy.to(device))
        want = train_step(reference, ref_optimizer, x.double(), dy.double())
        assert_steps_close(got, want, FP32_VS_FP64, f'{kind}, step {step}')
        if step in STATE_CHECKS:
            assert_states_close(model.state_dict(), reference.state_dict(), FP32_VS_FP64,
                                f'{kind}, state after step {step}')
    if kind != 'WSConv':
        assert int(model[1].num_batches_tracked) == STEPS
    for name, value in statistic_buffers(model).items():
        assert value.dtype == F32 and value.device.type == device.type, name


# ------------------------------------------ 2. half precision, large values
AUTOCAST_STEPS = 14  # MABN reaches its moving averages and r; BRN's bounds open


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['float16', 'bfloat16'])
@pytest.mark.parametrize('kind', KINDS)
def test_autocast_with_activations_of_1e3_to_1e4_stays_finite(kind, dtype, device):
    if device.type == 'cpu' and dtype == torch.float16 and NO_CPU_FLOAT16_AUTOCAST:
        pytest.skip(NO_CPU_FLOAT16_AUTOCAST)
    model = build(kind).to(device)
    # Scale the input so that the norm's input (the conv's output) has a
    # standard deviation of 2e3: its largest values are near 1e4, and its
    # second moment, 4e6, is far beyond float16's range (65504).
    with torch.no_grad():
        scale = 2e3 / model[0](batch(0)[0].to(device)).std().item()
    seen = []
    model[1].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    for step in range(AUTOCAST_STEPS):
        x, dy = (t.to(device) for t in batch(step))
        x = (x * scale).requires_grad_()
        with torch.autocast(device.type, dtype=dtype):
            y = model(x)
        y.backward(dy.to(y.dtype))
        assert torch.isfinite(y).all(), f'{kind}, step {step}: output'
        assert torch.isfinite(x.grad).all(), f'{kind}, step {step}: input gradient'
        for name, p in model.named_parameters():
            assert torch.isfinite(p.grad).all(), f'{kind}, step {step}: gradient of {name}'
        model.zero_grad(set_to_none=True)
    peak = largest(seen)
    assert 1e3 < peak < 6e4, peak  # large, and still within float16's range
    assert seen[0].dtype == dtype  # the conv ran in autocast's dtype
    buffers = statistic_buffers(model)
    assert bool(buffers) == (kind != 'WSConv')
    for name, value in buffers.items():
        assert value.dtype == F32, f'{kind}: {name} is {value.dtype}'
        assert torch.isfinite(value).all(), f'{kind}: {name}'


# ------------------------------------------------- 3. no host synchronisation
WARMUP_STEPS = 3
SYNC_STEPS = 20


@pytest.mark.parametrize('kind', KINDS)
def test_training_steps_make_no_host_synchronisation(kind, device):
    if device.type != 'cuda':
        pytest.skip(NO_SYNC_DEBUG_ON_CPU)
    model = build(kind).to(device)
    optimizer = sgd(model)
    data = [tuple(t.to(device) for t in batch(step)) for step in range(WARMUP_STEPS + SYNC_STEPS)]
    for x, dy in data[:WARMUP_STEPS]:  # one-off work (CBN allocates its ring) happens here
        train_step(model, optimizer, x, dy)
    torch.cuda.synchronize()
    # Steps 4 to 23 cross MABN's full window, moving averages and r, and
    # BRN's opening bounds, all under 'error': a synchronising call raises.
    torch.cuda.set_sync_debug_mode('error')
    try:
        steps = [train_step(model, optimizer, x, dy) for x, dy in data[WARMUP_STEPS:]]
    finally:
        torch.cuda.set_sync_debug_mode('default')
    torch.cuda.synchronize()
    assert len(steps) == SYNC_STEPS
    assert torch.isfinite(torch.stack([s.y for s in steps])).all()
    if kind != 'WSConv':
        assert int(model[1].num_batches_tracked) == WARMUP_STEPS + SYNC_STEPS


@pytest.mark.parametrize('kind', NORMS)
def test_nonfinite_flag_warns_when_read(kind, device):
    model = build(kind).to(device)
    norm = model[1]
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter('always')
        train(model, None, range(3), device)
        before = {k: v.clone() for k, v in statistic_buffers(model).items()}
        x, dy = batch(3)
        x[0, 0, 5, 5] = math.nan  # reaches every channel of the conv's output
        poisoned = train_step(model, None, x.to(device), dy.to(device))
        assert not torch.isfinite(poisoned.y).all()
        after_nan = {k: v.clone() for k, v in statistic_buffers(model).items()}
        last = train_step(model, None, *(t.to(device) for t in batch(4)))
        assert not nonfinite_warnings(records)  # the steps read nothing on the host
        model.eval()  # reads the device flag: the warning comes here
        model.train()
        model.state_dict()
    found = nonfinite_warnings(records)
    assert len(found) == 1, [str(w.message) for w in records]
    assert str(found[0].message).startswith(f'{kind}({C}): a batch statistic was inf or NaN')
    for name, value in statistic_buffers(model).items():
        assert torch.isfinite(value).all(), f'{kind}: {name}'
        assert torch.isfinite(after_nan[name]).all(), f'{kind}: {name} after the NaN step'
    # the NaN step left the running statistics as they were
    for name in ('running_var', 'running_mean'):
        if name in before:
            assert torch.equal(after_nan[name], before[name]), f'{kind}: {name}'
    assert torch.isfinite(last.y).all()  # training went on
    assert norm.step_flags.device == x.to(device).device


# ---------------------------------------- 4. state dicts across the devices
SAVED_AT, CONTINUED = 10, 10  # steps 11-20 cross MABN's r start and BRN's ramps


@pytest.mark.parametrize('direction', ['cuda_to_cpu', 'cpu_to_cuda'])
@pytest.mark.parametrize('kind', KINDS)
def test_state_dict_continues_on_the_other_device(kind, direction, device, no_tf32):
    first, second = (device, CPU) if direction == 'cuda_to_cpu' else (CPU, device)
    model = build(kind).to(first)
    optimizer = sgd(model)
    train(model, optimizer, range(SAVED_AT), first)
    saved = io.BytesIO()
    torch.save(model.state_dict(), saved)
    saved.seek(0)
    moved = build(kind).to(second)
    with torch.no_grad():  # so that nothing can come from the factory's weights
        for p in moved.parameters():
            p.add_(1)
    moved.load_state_dict(torch.load(saved, map_location=second))
    assert_states_close(moved.state_dict(), model.state_dict(), EXACT, f'{kind} loaded')
    for value in moved.state_dict().values():
        assert value.device.type == second.type
    moved_optimizer = sgd(moved)
    for step in range(SAVED_AT, SAVED_AT + CONTINUED):
        x, dy = batch(step)
        want = train_step(model, optimizer, x.to(first), dy.to(first))
        got = train_step(moved, moved_optimizer, x.to(second), dy.to(second))
        assert_steps_close(got, want, FP32_VS_FP32, f'{kind} {direction}, step {step}')
    assert_states_close(moved.state_dict(), model.state_dict(), FP32_VS_FP32,
                        f'{kind} {direction}, state at the end')


# ------------------------------------------------------- 5. channels_last
LAYOUT_STEPS = 14


@pytest.mark.parametrize('cudnn', [True, False], ids=['cudnn', 'no_cudnn'])
@pytest.mark.parametrize('kind', KINDS)
def test_channels_last_matches_contiguous(kind, cudnn, device, no_tf32):
    if not cudnn and device.type != 'cuda':
        pytest.skip(NO_CUDNN_ON_CPU)
    contiguous = build(kind).to(device)
    channels_last = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    assert channels_last[0].weight.is_contiguous(memory_format=torch.channels_last)
    optimizer, cl_optimizer = sgd(contiguous), sgd(channels_last)
    x_eval = batch(LAYOUT_STEPS)[0].to(device)
    with cudnn_enabled(cudnn):
        for step in range(LAYOUT_STEPS):
            x, dy = (t.to(device) for t in batch(step))
            want = train_step(contiguous, optimizer, x, dy)
            got = train_step(channels_last, cl_optimizer, x, dy,
                             memory_format=torch.channels_last)
            assert_steps_close(got, want, FP32_VS_FP32, f'{kind} channels_last, step {step}')
        contiguous.eval()
        channels_last.eval()
        with torch.no_grad():
            want = contiguous(x_eval)
            got = channels_last(x_eval.contiguous(memory_format=torch.channels_last))
    assert_close(got, want, FP32_VS_FP32, f'{kind} channels_last, eval output')
    assert_states_close(channels_last.state_dict(), contiguous.state_dict(), FP32_VS_FP32,
                        f'{kind} channels_last, state at the end')


# ------------------------------------------------- 6. sync_stats over NCCL
WORLD = 2
# Each step's batch size on rank 0 and rank 1 (different sizes and inputs).
RANK_SIZES = [(2, 1), (1, 3), (2, 2), (3, 1), (1, 2), (2, 1)]
RANK_SHAPE = (C_IN, 8, 8)
# What the 6 DDP steps cross: MABN's window of 2 is full after t = 2 (moving
# averages from t = 3) and r leaves 1 after t = 3; CBN averages over its window
# from the second step; BRN's bounds open after t = 2, fully at t = 5.
SYNC_CFG = dict(MABN=dict(buffer_size=2, warmup_iters=2, renorm_start_iter=3),
                CBN=dict(buffer_num=2), BRN=dict(warmup_iters=2, rmax_iters=5, dmax_iters=4))


def rank_batch(step, rank, n):
    """Rank ``rank``'s (x, dy) at ``step``: ranks differ in scale and offset."""
    return batch(step, seed=1 + rank, shape=(n,) + RANK_SHAPE, scale=1 + rank, offset=rank)


def _sync_stats_worker(rank, port, out_dir, backend):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    if backend == 'nccl':
        torch.cuda.set_device(rank)
        device = torch.device('cuda', rank)
        torch.backends.cuda.matmul.allow_tf32 = False  # a fresh process: TF32 is on in cuDNN
        torch.backends.cudnn.allow_tf32 = False
    else:
        torch.set_num_threads(1)
        device = CPU
    dist.init_process_group(backend, init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    results = {}
    for kind in NORMS:
        model = build(kind, sync_stats=True, **SYNC_CFG[kind]).to(device)
        ddp = DistributedDataParallel(model, device_ids=[rank] if backend == 'nccl' else None,
                                      broadcast_buffers=False)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
        for step, sizes in enumerate(RANK_SIZES):
            x, dy = rank_batch(step, rank, sizes[rank])
            ddp(x.to(device)).backward(dy.to(device))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        results[kind] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    exit_without_teardown()


@pytest.fixture(scope='module')
def sync_stats_runs(device, tmp_path_factory):
    """Both ranks' final state dicts, by kind: NCCL on two GPUs (skipped with
    fewer), gloo on the CPU with MMNORM_CUDA_TESTS_ON_CPU=1."""
    import torch.multiprocessing as mp
    if device.type == 'cuda':
        count = torch.cuda.device_count()
        if count < WORLD:
            pytest.skip(f'needs 2 GPUs: this machine has {count}')
        backend = 'nccl'
    else:
        backend = 'gloo'
    out_dir = tmp_path_factory.mktemp('cuda_sync_stats')
    mp.spawn(_sync_stats_worker, args=(free_port(), str(out_dir), backend), nprocs=WORLD)
    return [torch.load(out_dir / f'rank{rank}.pt') for rank in range(WORLD)]


def train_on_union(kind, device):
    """One process on the concatenation of the ranks' batches, backpropagating
    the sum of their losses with the gradients divided by the world size: the
    update DDP makes, with the statistics of the union."""
    model = build(kind, **SYNC_CFG[kind]).to(device)
    optimizer = sgd(model)
    for step, sizes in enumerate(RANK_SIZES):
        parts = [rank_batch(step, rank, n) for rank, n in enumerate(sizes)]
        x = torch.cat([x for x, _ in parts]).to(device)
        dy = torch.cat([dy for _, dy in parts]).to(device)
        model(x).backward(dy)
        for p in model.parameters():
            p.grad /= WORLD
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


@pytest.mark.parametrize('kind', NORMS)
def test_sync_stats_ranks_agree_and_equal_one_process_on_the_union(sync_stats_runs, kind,
                                                                    device, no_tf32):
    rank0, rank1 = (run[kind] for run in sync_stats_runs)
    # the all-reduces and all-gathers hand every rank the same numbers
    assert_states_close(rank1, rank0, EXACT, f'{kind}: rank 1 against rank 0')
    expected = train_on_union(kind, device)
    assert_states_close(rank0, expected, FP32_VS_FP32, f'{kind}: ranks against the union')
    assert int(rank0['1.num_batches_tracked']) == len(RANK_SIZES)
    assert not torch.equal(rank0['1.running_var'], torch.ones(C))


# ------------------------------------------------------ 7. torch.compile
COMPILE_STEPS = 10
# Every phase within 10 steps: MABN's window of 2 is full after t = 2, warm-up
# ends at t = 4, r leaves 1 after t = 6; BRN's bounds open after t = 2 and
# reach dmax at t = 6 and rmax at t = 8.
COMPILE_CFG = dict(MABN=dict(buffer_size=2, warmup_iters=4, renorm_start_iter=6),
                   BRN=dict(warmup_iters=2, rmax_iters=8, dmax_iters=6))


@pytest.mark.parametrize('kind', ['MABN', 'BRN'])
def test_compiled_training_matches_eager(kind, device, no_tf32):
    eager = build(kind, **COMPILE_CFG[kind]).to(device)
    model = copy.deepcopy(eager)
    optimizer, compiled_optimizer = sgd(eager), sgd(model)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    try:
        for step in range(COMPILE_STEPS):
            x, dy = (t.to(device) for t in batch(step))
            want = train_step(eager, optimizer, x, dy)
            got = train_step(model, compiled_optimizer, x, dy, forward=compiled)
            assert_steps_close(got, want, FP32_VS_FP32, f'{kind} compiled, step {step}')
    finally:
        torch._dynamo.reset()
    assert_states_close(model.state_dict(), eager.state_dict(), FP32_VS_FP32,
                        f'{kind} compiled, state at the end')
    assert int(model[1].num_batches_tracked) == COMPILE_STEPS


# ------------------------------------------------------- 8. the fused kernels
# On CUDA the layers take the fused Triton kernels where Triton can run them
# (every test above then tests that path); here the fused and the ATen path
# train twins side by side, and the launches of a step are counted.
FUSED_STEPS = 24  # crosses MABN's window, warm-up and r; BRN's bounds opening; CBN's ring


@pytest.mark.parametrize('memory_format', [None, torch.channels_last],
                         ids=['contiguous', 'channels_last'])
@pytest.mark.parametrize('kind', NORMS)
def test_fused_kernels_match_the_aten_path(kind, memory_format, device, no_tf32):
    from mmnorm.layers import paths
    if device.type == 'cuda' and paths.triton_problem() is None:
        assert paths.fused(torch.empty(1, device=device))
    fused = build(kind).to(device)
    aten = copy.deepcopy(fused)
    optimizers = sgd(fused), sgd(aten)
    for step in range(FUSED_STEPS):
        x, dy = (t.to(device) for t in batch(step))
        got = train_step(fused, optimizers[0], x, dy, memory_format)
        paths.select('aten')
        try:
            want = train_step(aten, optimizers[1], x, dy, memory_format)
        finally:
            paths.select()
        assert_steps_close(got, want, FP32_VS_FP32, f'{kind} fused, step {step}')
    assert_states_close(fused.state_dict(), aten.state_dict(), FP32_VS_FP32,
                        f'{kind} fused, state at the end')


def test_fused_launches_per_step(device):
    from mmnorm.benchmark.layers import forward_context, incoming_grad, ops_per_step
    shape = (2, 64, 16, 16)
    x = torch.randn(shape, device=device, requires_grad=True)
    grad_for = incoming_grad(torch.randn(shape, device=device))
    counts = {}
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    for name, module in (('BatchNorm2d', nn.BatchNorm2d(64)), ('MABN', MABN(64)),
                         ('BRN', BRN(64)), ('conv + CBN', nn.Sequential(conv, CBN(64)))):
        module = module.to(device)
        for _ in range(3):
            module(x).backward(grad_for(x))
        counts[name] = sum(ops_per_step(module, x, grad_for, forward_context(device, 'float32')))
    print('operators + launches per training step:', counts)
    assert counts['BatchNorm2d'] == 7, counts
    from mmnorm.layers import paths
    if paths.fused(x):  # (the ATen path, on the CPU or with an old Triton, takes dozens)
        # two launches per direction (docs/kernels.md, "How a step is split")
        assert counts['MABN'] <= 10 and counts['BRN'] <= 10 and counts['conv + CBN'] <= 18, counts


# ------------------------- 9. the fused kernels: many programs, any input
# The fused path against the ATen path as in 8, where a GPU can differ from
# the small tests above: thousands of channels (hundreds of programs per
# launch), grouped convs, views of larger tensors, float64 (a scalar rounded
# to float32 shows at 1e-8), a preset flag buffer and a device that is not the
# current one. Short schedules, so that a few steps cross every phase: MABN
# takes batch statistics while t <= 2 (the window of 2) and renormalises from
# t = 3; BRN's bounds open at t = 2 and are fully open at t = 3; CBN's window
# of 2 past steps is full at t = 3 and wraps at t = 4.
SHORT_CFG = dict(MABN=dict(buffer_size=2, warmup_iters=1, renorm_start_iter=2),
                 BRN=dict(warmup_iters=1, rmax_iters=3, dmax_iters=2),
                 CBN=dict(buffer_num=2, rho=1.0))
SHORT_STEPS = 4
WIDE, WIDE_STEPS = 2048, 3  # as the res5 stage; 3 steps: Triton's interpreter takes a minute
FP64_VS_FP64 = 1e-12
NEEDS_TWO_GPUS = 'needs 2 GPUs (a layer on cuda:1 while cuda:0 is current)'


def bare(kind, channels=C, **cfg):
    """The norm ``kind`` alone (no conv before it), its affine parameters
    away from (1, 0) as in :func:`build`."""
    torch.manual_seed(0)
    norm = dict(MABN=MABN, BRN=BRN, CBN=CBN)[kind](channels, **cfg)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    return norm


def draws(step, shape, out_shape=None, dtype=F32):
    """(x of ``shape``, dy of ``out_shape`` or ``shape``) of ``step`` in
    ``dtype`` on the CPU: drawn in float64, rounded."""
    gen = torch.Generator().manual_seed(20_000 + step)
    x = torch.randn(shape, generator=gen, dtype=F64) * 1.5 + 0.5
    dy = torch.randn(out_shape or shape, generator=gen, dtype=F64)
    return x.to(dtype), dy.to(dtype)


@contextmanager
def aten_path():
    """Every layer takes the ATen path meanwhile; afterwards the path of
    MMNORM_KERNELS again."""
    from mmnorm.layers import paths
    paths.select('aten')
    try:
        yield
    finally:
        paths.select()


def needs_fused(device):
    """Skip unless the layers' training steps on ``device`` take the fused
    kernels (on CUDA, where Triton can run them, they must); then import the
    kernels' modules, so that every launch is recorded from the first step."""
    from mmnorm.layers import ahead_of_time, paths
    probe = torch.empty(0, device=device)
    if device.type == 'cuda' and paths.triton_problem() is None:
        assert paths.fused(probe), f'the fused kernels failed: {paths.FAILED_DEVICES}'
    else:
        try:
            takes_fused = paths.fused(probe)
        except RuntimeError as error:
            pytest.skip(str(error))
        if not takes_fused:
            pytest.skip(f'the fused kernels do not run on {device.type} here '
                        f'({paths._REASON[0]}); on the CPU '
                        "MMNORM_KERNELS=triton TRITON_INTERPRET=1 runs them in Triton's "
                        'interpreter')
    ahead_of_time.kernel_modules()


def fused_against_aten(model, data, tol, what, memory_format=None, view=None):
    """Train ``model`` on the fused path and a copy on the ATen path with SGD
    over ``data`` [(x, dy)], comparing every step and the state at the end.
    Returns the grids of the fused twin's Triton launches (one at least)."""
    from mmnorm.benchmark.layers import launch_grids
    aten = copy.deepcopy(model)
    optimizers = sgd(model), sgd(aten)
    grids = []
    for step, (x, dy) in enumerate(data):
        with launch_grids(grids):
            got = train_step(model, optimizers[0], x, dy, memory_format, view=view)
        with aten_path():
            want = train_step(aten, optimizers[1], x, dy, memory_format, view=view)
        assert_steps_close(got, want, tol, f'{what}, step {step}')
    assert_states_close(model.state_dict(), aten.state_dict(), tol, f'{what}, state at the end')
    assert grids, f'{what}: no Triton launch'
    return grids


@pytest.mark.parametrize('memory_format', [None, torch.channels_last],
                         ids=['contiguous', 'channels_last'])
@pytest.mark.parametrize('kind', ['MABN', 'BRN'])
def test_fused_kernels_at_2048_channels_match_the_aten_path(kind, memory_format, device,
                                                            no_tf32):
    from mmnorm.benchmark.layers import fewest_programs
    needs_fused(device)
    shape = (2, WIDE, 5, 7)
    data = [tuple(t.to(device) for t in draws(step, shape)) for step in range(WIDE_STEPS)]
    norm = bare(kind, WIDE, **SHORT_CFG[kind]).to(device)
    grids = fused_against_aten(norm, data, FP32_VS_FP32, f'{kind}({WIDE}) fused',
                               memory_format)
    # a program per 32 channels at most: 64 programs per launch at least
    assert fewest_programs(grids) >= WIDE // 32, grids


@pytest.mark.parametrize('memory_format', [None, torch.channels_last],
                         ids=['contiguous', 'channels_last'])
def test_fused_grouped_conv_cbn_matches_the_aten_path(memory_format, device, no_tf32):
    needs_fused(device)
    torch.manual_seed(0)
    channels, groups = 64, 4
    model = nn.Sequential(nn.Conv2d(8, channels, 3, padding=1, groups=groups),
                          CBN(channels, **SHORT_CFG['CBN'])).to(device)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    first = model[0].weight.detach().clone()
    data = [tuple(t.to(device) for t in draws(step, (2, 8, 6, 6), (2, channels, 6, 6)))
            for step in range(SHORT_STEPS + 1)]
    fused_against_aten(model, data, FP32_VS_FP32, f'conv (groups={groups}) + CBN fused',
                       memory_format)
    # SGD moved the conv's weight: the past statistics were compensated
    assert not torch.allclose(model[0].weight, first)


VIEWS = {  # base shape, its memory format, the view the layer gets
    'channel_slice': ((2, C + 4, 6, 6), None, lambda base: base[:, :C]),
    'channel_slice_channels_last': ((2, C + 4, 6, 6), torch.channels_last,
                                    lambda base: base[:, 2:C + 2]),
    'batch_slice': ((5, C, 6, 6), None, lambda base: base[::2]),
}


@pytest.mark.parametrize('case', VIEWS)
@pytest.mark.parametrize('kind', NORMS)
def test_fused_kernels_on_views_of_larger_tensors_match_the_aten_path(kind, case, device,
                                                                      no_tf32):
    needs_fused(device)
    base_shape, memory_format, view = VIEWS[case]
    probe = view(torch.empty(base_shape).contiguous(memory_format=memory_format or
                                                    torch.contiguous_format))
    assert not probe.is_contiguous() and not probe.is_contiguous(
        memory_format=torch.channels_last)
    # CBN with no conv before it: rho = 0 (nothing to compensate)
    cfg = dict(SHORT_CFG[kind], **(dict(rho=0.0) if kind == 'CBN' else {}))
    data = [tuple(t.to(device) for t in draws(step, base_shape, probe.shape))
            for step in range(SHORT_STEPS)]
    fused_against_aten(bare(kind, **cfg).to(device), data, FP32_VS_FP32,
                       f'{kind} fused on a {case}', memory_format, view)


@pytest.mark.parametrize('kind', NORMS)
def test_fused_kernels_in_float64_match_the_aten_path_to_1e_12(kind, device):
    needs_fused(device)
    model = build(kind, **SHORT_CFG[kind]).double().to(device)
    data = [tuple(t.to(device, F64) for t in batch(step)) for step in range(SHORT_STEPS)]
    fused_against_aten(model, data, FP64_VS_FP64, f'{kind} fused in float64')


PRESET_FLAGS = (1, -1)  # the non-finite flag set; every bit of the int32 set


def parameters_and_buffers(model, leave_out='step_flags'):
    """Every parameter and buffer of ``model`` but ``leave_out``, read without
    a state dict (which reads the flag)."""
    return {name: value.detach() for name, value in
            [*model.named_parameters(), *model.named_buffers()]
            if name.rsplit('.', 1)[-1] != leave_out}


@pytest.mark.parametrize('kind', NORMS)
def test_preset_step_flags_change_no_output_and_no_other_buffer(kind, device, no_tf32):
    # the flag is only ever set, never read to decide anything in a step:
    # whatever it holds before training, the steps are those of a fresh layer
    fresh = build(kind, **SHORT_CFG[kind]).to(device)
    runs = {}
    for value in (0, *PRESET_FLAGS):
        model = copy.deepcopy(fresh)
        model[1].step_flags.fill_(value)
        runs[value] = model, train(model, sgd(model), range(SHORT_STEPS), device)
    reference, want = runs[0]
    for value in PRESET_FLAGS:
        model, got = runs[value]
        for step, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_steps_close(a, b, FP32_VS_FP32, f'{kind}, step_flags {value}, step {step}')
        assert_states_close(parameters_and_buffers(model), parameters_and_buffers(reference),
                            FP32_VS_FP32, f'{kind}, step_flags {value}, at the end')
        assert int(model[1].num_batches_tracked) == SHORT_STEPS


@pytest.mark.parametrize('kind', NORMS)
def test_fused_kernels_on_a_device_that_is_not_current(kind, device, no_tf32):
    if device.type != 'cuda':
        pytest.skip(f'{NEEDS_TWO_GPUS}: this run is on the CPU')
    count = torch.cuda.device_count()
    if count < 2:
        pytest.skip(f'{NEEDS_TWO_GPUS}: this machine has {count}')
    other = torch.device('cuda', 1)
    needs_fused(other)
    with torch.cuda.device(0):
        model = build(kind, **SHORT_CFG[kind]).to(other)
        data = [tuple(t.to(other) for t in batch(step)) for step in range(SHORT_STEPS)]
        fused_against_aten(model, data, FP32_VS_FP32, f'{kind} fused on {other}')
        assert torch.cuda.current_device() == 0
    for name, value in [*model.named_parameters(), *model.named_buffers()]:
        assert value.device == other, name


def test_every_registered_layer_is_covered():
    from mmnorm.layers import conv_types, norm_types
    assert set(norm_types()) <= set(NORMS) and set(conv_types()) <= set(KINDS) | {'CenConv'}
