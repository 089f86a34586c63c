"""The fused Triton path of MABN, BRN and CBN against the ATen path, on CPU tensors
through Triton's interpreter (TRITON_INTERPRET=1, set here before the kernels
are defined), so that the path a GPU takes is tested on this machine.

Each test runs a layer and a deep copy of it on the same data, one on each
path, and compares outputs, gradients and every buffer. The fused kernels sum
in another order than ATen's kernels: float32 results agree to rounding
(FLOAT32), half outputs to one unit in their last place (HALF)."""
import os

os.environ['TRITON_INTERPRET'] = '1'  # noqa: E402  (read by Triton when a kernel is defined)

import contextlib
import copy
import functools
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mmnorm import BRN, CBN, MABN, CenConv
from mmnorm.benchmark.layers import forward_context, incoming_grad, ops_per_step
from mmnorm.engine.precise_bn import precise_statistics
from mmnorm.layers import paths

ROOT = Path(__file__).resolve().parents[2]
PROBLEM = paths.triton_problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None,
                                reason=f'the fused path needs Triton: {PROBLEM}')

F64 = torch.float64
FLOAT32 = dict(rtol=2e-5, atol=2e-5)
HALF = dict(rtol=1e-2, atol=1e-2)
# Schedules that 9 steps cross: MABN's window (2) fills, warm-up ends at 3 and
# r leaves 1 after 4; BRN's bounds open after 2 and reach rmax, dmax at 5 and 4.
CONFIGS = dict(MABN=(MABN, dict(buffer_size=2, warmup_iters=3, renorm_start_iter=4)),
               BRN=(BRN, dict(momentum=0.1, warmup_iters=2, rmax_iters=5, dmax_iters=4)))
STEPS = 9
# CBN behind a conv (it reads the conv from autograd): k = 3, so 9 steps pool,
# compensate with moved weights and wrap around the ring; burn-in grows the window.
CBN_CONFIG = dict(buffer_num=3, burnin=3, two_stage=False)


@contextlib.contextmanager
def kernels(mode):
    """The layers' path for CPU tensors: 'triton' (the interpreter) or 'aten'."""
    paths.select(mode)
    try:
        yield
    finally:
        paths.select()


def layer(kind, channels=6, dtype=torch.float32):
    cls, cfg = CONFIGS[kind]
    torch.manual_seed(0)
    norm = cls(channels, **cfg).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    return norm


def step(module, x, dy, mode, autocast=None):
    """One training step on ``mode``'s path: (y, dx, parameter grads)."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    context = (torch.autocast('cpu', dtype=autocast) if autocast is not None
               else contextlib.nullcontext())
    with kernels(mode), context:
        y = module(x)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, {k: p.grad for k, p in module.named_parameters()}


def state(module):
    """Parameters and every buffer (``step_flags`` too), without saving a state
    dict (which reads the non-finite flag)."""
    return dict(module.named_parameters()) | dict(module.named_buffers())


def assert_same_state(fused, aten, tolerance, sums=()):
    """Every parameter and buffer equal within ``tolerance``; for the buffers
    named in ``sums`` (sums whose terms cancel) atol is relative to the
    buffer's largest entry."""
    for (key, a), b in zip(state(fused).items(), state(aten).values(), strict=True):
        if a.is_floating_point():
            close = dict(tolerance)
            if key.endswith(sums) and b.numel():
                close['atol'] *= max(1.0, float(b.abs().max()))
            torch.testing.assert_close(a.detach(), b.detach(), msg=key, **close)
        else:
            assert torch.equal(a, b), key


def run_both(module, batches, tolerance, autocast=None):
    """Train ``module`` on the fused path and a copy on the ATen path over
    ``batches`` [(x, dy)], comparing everything after every step."""
    reference = copy.deepcopy(module)
    for x, dy in batches:
        y, dx, grads = step(module, x, dy, 'triton', autocast)
        y_ref, dx_ref, grads_ref = step(reference, x, dy, 'aten', autocast)
        assert y.dtype == y_ref.dtype and y.stride() == y_ref.stride()
        assert dx.dtype == x.dtype and dx.stride() == x.stride()
        torch.testing.assert_close(y, y_ref, **tolerance)
        torch.testing.assert_close(dx, dx_ref, **tolerance)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, grads_ref[name], msg=name, **tolerance)
        assert_same_state(module, reference, tolerance)
    return module


def batches(shape, steps=STEPS, dtype=torch.float32, memory_format=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(steps):
        x = torch.randn(shape, generator=gen) * (1 + i % 3) + 0.5
        dy = torch.randn(shape, generator=gen)
        if memory_format is not None:
            x = x.contiguous(memory_format=memory_format)
        out.append((x.to(dtype), dy.to(dtype)))
    return out


# -------------------------------------------------------- the same numbers
@pytest.mark.parametrize('kind', CONFIGS)
@pytest.mark.parametrize('shape, memory_format', [
    ((3, 6, 5, 7), None),
    ((2, 6, 4, 3), torch.channels_last),
    ((5, 6), None),  # (N, C): one position per sample
    ((2, 6, 7), None),
    ((1, 6, 2, 3, 3), torch.channels_last_3d),
    ((3, 70, 1, 1), None),  # more channels than one program's block, 1 x 1 maps
], ids=['nchw', 'channels_last', '2d', '3d', 'channels_last_3d', 'c70_1x1'])
def test_fused_steps_match_aten_over_every_phase(kind, shape, memory_format):
    norm = layer(kind, channels=shape[1])
    run_both(norm, batches(shape, memory_format=memory_format), FLOAT32)
    assert int(norm.num_batches_tracked) == STEPS


@pytest.mark.parametrize('kind', CONFIGS)
def test_fused_steps_match_aten_in_float64(kind):
    run_both(layer(kind, dtype=F64), batches((2, 6, 3, 5), dtype=F64),
             dict(rtol=1e-12, atol=1e-12))


@pytest.mark.parametrize('kind', CONFIGS)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_fused_steps_match_aten_under_autocast(kind, dtype):
    # half activations under autocast, float32 statistics and buffers
    norm = run_both(layer(kind), batches((2, 6, 5, 5), dtype=dtype), HALF, autocast=dtype)
    assert norm.running_var.dtype == torch.float32


@pytest.mark.parametrize('kind', CONFIGS)
def test_fused_gradient_only_for_the_parameters(kind):
    # an input that needs no gradient: the backward skips dx
    norm, reference = layer(kind), layer(kind)
    for x, dy in batches((2, 6, 3, 3), steps=3):
        for module, mode in ((norm, 'triton'), (reference, 'aten')):
            module.zero_grad()
            with kernels(mode):
                module(x).backward(dy)
        torch.testing.assert_close(norm.weight.grad, reference.weight.grad, **FLOAT32)
    assert_same_state(norm, reference, FLOAT32)


@pytest.mark.parametrize('kind', CONFIGS)
@pytest.mark.parametrize('bad_step', [1, 7])  # early phase / moving averages and open bounds
def test_nonfinite_batch_keeps_the_buffers_like_aten(kind, bad_step):
    data = batches((2, 6, 3, 3))
    x = data[bad_step][0].clone()
    x[0, 0, 1, 1] = float('inf')
    x[1, 1, 0, 2] = float('nan')
    data[bad_step] = (x, data[bad_step][1])
    norm = layer(kind)
    reference = copy.deepcopy(norm)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter('always')
        for i, (x, dy) in enumerate(data):
            y, dx, _ = step(norm, x, dy, 'triton')
            y_ref, dx_ref, _ = step(reference, x, dy, 'aten')
            torch.testing.assert_close(y, y_ref, equal_nan=True, **FLOAT32)
            torch.testing.assert_close(dx, dx_ref, equal_nan=True, **FLOAT32)
            assert_same_state(norm, reference, FLOAT32)  # step_flags included
            for key, value in state(norm).items():
                if value.is_floating_point():
                    assert torch.isfinite(value).all(), (i, key)
        assert norm.step_flags[0] == 1
        assert not nonfinite_warnings(records)  # nothing read on the host during the steps
        norm.train()  # reads the flag
    assert len(nonfinite_warnings(records)) == 1


def nonfinite_warnings(records):
    # (the interpreter's numpy also warns of the inf - inf it computes)
    return [w for w in records if 'inf or NaN' in str(w.message)]


def test_nonfinite_gradient_never_enters_buffer_gz():
    norm = layer('MABN')
    reference = copy.deepcopy(norm)
    data = batches((2, 6, 3, 3), steps=5)
    dy = data[3][1].clone()
    dy[0, 1, 0, 0] = float('inf')
    data[3] = (data[3][0], dy)
    for x, dy in data:
        step(norm, x, dy, 'triton')
        step(reference, x, dy, 'aten')
        assert_same_state(norm, reference, FLOAT32)
    assert torch.isfinite(norm.buffer_gz).all() and norm.step_flags[0] == 1


@pytest.mark.parametrize('kind', CONFIGS)
def test_empty_batch_changes_nothing(kind):
    norm = layer(kind)
    for x, dy in batches((2, 6, 3, 3), steps=3):
        step(norm, x, dy, 'triton')
    before = copy.deepcopy(norm.state_dict())
    y, dx, grads = step(norm, torch.zeros(0, 6, 3, 3), torch.zeros(0, 6, 3, 3), 'triton')
    assert y.shape == (0, 6, 3, 3) and dx.shape == (0, 6, 3, 3)
    assert all(torch.equal(g, torch.zeros(6)) for g in grads.values())
    for key, value in norm.state_dict().items():
        assert torch.equal(value, before[key]), key


# ---------------------------------------------------------------- CBN
def conv_cbn(conv=None, dtype=torch.float32, **cfg):
    """conv -> CBN with affine parameters away from (1, 0)."""
    torch.manual_seed(0)
    conv = conv or nn.Conv2d(4, 6, 3, padding=1, bias=False)
    model = nn.Sequential(conv, CBN(conv.out_channels, **dict(CBN_CONFIG, **cfg))).to(dtype)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    return model


def cbn_batches(model, shape=(2, 4, 7, 6), steps=STEPS, dtype=torch.float32,
                memory_format=None):
    """(x, dy) pairs for conv -> CBN, dy shaped like the conv's output."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(steps):
        x = torch.randn(shape, generator=gen) * (1 + i % 3) + 0.5
        with torch.no_grad():
            dy = torch.randn(model[0](x.to(dtype)).shape, generator=gen)
        if memory_format is not None:
            x = x.contiguous(memory_format=memory_format)
        out.append((x.to(dtype), dy.to(dtype)))
    return out


def run_cbn_both(model, data, tolerance, autocast=None, learning_rate=0.2, reference=None):
    """:func:`run_both` for conv -> CBN (``reference``: the ATen twin, default
    a copy of ``model``), with an SGD step after each training step (unless
    ``learning_rate`` is None) so that the conv's weight moves and the
    compensation is not zero; the twin takes the fused model's new weights.
    Returns the twin."""
    reference = copy.deepcopy(model) if reference is None else reference
    for x, dy in data:
        got = step(model, x, dy, 'triton', autocast)[:2]  # (y, dx)
        want = step(reference, x, dy, 'aten', autocast)[:2]
        for name, a, b in zip(('y', 'dx'), got, want):
            assert a.dtype == b.dtype and a.stride() == b.stride()
            close = dict(tolerance)
            if name == 'dx' and autocast is torch.bfloat16:
                # The conv's backward sums dy * w over channels and taps: dy's
                # last-place differences (INTERPRETED_BF16) show relative to dx's largest
                # entry (measured: up to 0.0101 of it over the 6 steps).
                close['atol'] = 2 ** -6 * float(b.abs().max())
            torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m, n=name: f'{n}: {m}',
                                       **close)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            close = dict(tolerance)
            if name.startswith('0.'):  # the conv's: sums over the batch of dx-sized products
                close['atol'] *= max(1.0, float(q.grad.abs().max()))
            torch.testing.assert_close(p.grad, q.grad, msg=name, equal_nan=True, **close)
        if learning_rate is not None:  # the twin takes the same weights: no drift compounds
            with torch.no_grad():
                for p, q in zip(model.parameters(), reference.parameters()):
                    q.copy_(p.sub_(learning_rate * p.grad))
        # S_nu is a weight gradient: its small entries are differences of large
        # products, where the rounding of the twins' weights shows.
        assert_same_state(model, reference, tolerance, sums=('history_dsqmean',))
    return reference


@pytest.mark.parametrize('conv, cfg, memory_format', [
    (nn.Conv2d(4, 6, 3, padding=1, bias=False), {}, None),
    (nn.Conv2d(4, 6, 3, padding=1, bias=False), {}, torch.channels_last),
    (nn.Conv2d(4, 6, 3, padding=1, groups=2), {}, None),
    (nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2), {}, None),
    (nn.Conv2d(4, 70, 1, bias=False), {}, None),  # more channels than a program's block
    (nn.Conv2d(4, 6, 3, padding=1, padding_mode='reflect'), {}, None),
    (CenConv(4, 6, 3, padding=1), {}, None),
    (nn.Conv2d(4, 6, 3, padding=1, bias=False), dict(rho=0.0), None),
    (nn.Conv2d(4, 6, 3, padding=1, bias=False), dict(burnin=4, two_stage=True), None),
], ids=['3x3', 'channels_last', 'groups', 'stride_dilation', 'c70_1x1', 'reflect', 'cenconv',
        'rho0', 'two_stage'])
def test_cbn_fused_steps_match_aten_over_every_phase(conv, cfg, memory_format):
    model = conv_cbn(copy.deepcopy(conv), **cfg)
    if memory_format is not None:
        model = model.to(memory_format=memory_format)
    run_cbn_both(model, cbn_batches(model, memory_format=memory_format), FLOAT32)
    assert int(model[1].num_batches_tracked) == STEPS
    assert int(model[1].history_pushes) == STEPS - (0 if cfg.get('two_stage') is None else 4)


def test_cbn_fused_steps_match_aten_in_float64():
    model = conv_cbn(dtype=F64)
    run_cbn_both(model, cbn_batches(model, dtype=F64), dict(rtol=1e-12, atol=1e-12))


# Triton's interpreter rounds float32 to bfloat16 toward zero (a GPU to the
# nearest): outputs of up to 16 differ by one unit in the last place (2^-7
# relative), and the conv's input gradient sums such values.
INTERPRETED_BF16 = dict(rtol=2 ** -6, atol=2 ** -5)


@pytest.mark.parametrize('dtype, tolerance', [(torch.bfloat16, INTERPRETED_BF16),
                                              (torch.float16, HALF)], ids=['bf16', 'fp16'])
def test_cbn_fused_steps_match_aten_under_autocast(dtype, tolerance):
    model = conv_cbn()
    run_cbn_both(model, cbn_batches(model, steps=6), tolerance, autocast=dtype)
    assert model[1].history_sqmean.dtype == torch.float32


@pytest.mark.parametrize('bad', ['input', 'weight'])
def test_cbn_nonfinite_step_keeps_the_buffers_like_aten(bad):
    model = conv_cbn(burnin=0)
    data = cbn_batches(model)
    reference = run_cbn_both(model, data[:3], FLOAT32)
    if bad == 'input':
        x = data[3][0].clone()
        x[0, 0, 1, 1] = float('nan')
        data[3] = (x, data[3][1])
    else:  # an inf in theta: that channel's ring entry is refused
        for module in (model, reference):
            with torch.no_grad():
                module[0].weight[2, 0, 0, 0] = float('inf')
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter('always')
        run_cbn_both(model, data[3:4], FLOAT32, learning_rate=None, reference=reference)
        assert not nonfinite_warnings(records)  # nothing read on the host during the steps
        assert (model[1].history_valid[0] == 0).any()  # this step's slot
        for module in (model, reference):
            with torch.no_grad():
                module[0].weight.nan_to_num_(0.0, 0.0, 0.0)
        run_cbn_both(model, data[4:], FLOAT32, reference=reference)
        assert model[1].step_flags[0] == 1
        model.train()  # reads the flag
    assert len(nonfinite_warnings(records)) == 1
    for key, value in model[1].named_buffers():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key


def test_cbn_fused_step_without_grad_is_plain_bn():
    model = conv_cbn(burnin=0)
    data = cbn_batches(model, steps=4)
    run_cbn_both(model, data[:2], FLOAT32)
    reference = copy.deepcopy(model)
    outputs = []
    for module, mode in ((model, 'triton'), (reference, 'aten')):
        with torch.no_grad(), kernels(mode):
            outputs.append(module(data[2][0]))
    torch.testing.assert_close(*outputs, **FLOAT32)
    assert_same_state(model, reference, FLOAT32)
    assert int(model[1].history_pushes) == 2 and int(model[1].num_batches_tracked) == 3


def test_cbn_fused_resume_continues_exactly():
    data = cbn_batches(conv_cbn())
    whole, first = conv_cbn(), conv_cbn()
    run = functools.partial(run_cbn_both, tolerance=FLOAT32)
    run(whole, data)
    run(first, data[:5])
    resumed = conv_cbn()
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    run(resumed, data[5:])
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


@pytest.mark.parametrize('burnin, two_stage, steps', [
    (0, False, STEPS), (30, True, 34), (30, False, 34)])  # past a 30-step burn-in, both kinds
def test_cbn_fused_steps_read_nothing_on_the_host(burnin, two_stage, steps):
    model = conv_cbn(buffer_num=3, burnin=burnin, two_stage=two_stage)
    data = cbn_batches(model, steps=steps)
    x = data[4][0].clone()
    x[0, 0, 0, 0] = float('nan')
    data[4] = (x, data[4][1])
    with kernels('triton'):
        model(data[0][0]).sum().backward()  # the host learns the counters once
        with FailOnHostRead():
            for x, dy in data[1:]:
                model(x.requires_grad_()).backward(dy)
    pushed = sum(model[1].window_size(t) > 0 for t in range(1, steps + 1))
    assert int(model[1].num_batches_tracked) == steps
    assert int(model[1].history_pushes) == pushed > 0


# ------------------------------------------------ the hidden-state guarantees
@pytest.mark.parametrize('kind', CONFIGS)
def test_fused_resume_continues_exactly(kind):
    data = batches((2, 6, 4, 4))
    whole = layer(kind)
    for x, dy in data:
        step(whole, x, dy, 'triton')
    first = layer(kind)
    for x, dy in data[:4]:
        step(first, x, dy, 'triton')
    resumed = layer(kind)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    for x, dy in data[4:]:
        y, _, _ = step(resumed, x, dy, 'triton')
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    with kernels('triton'):
        assert torch.equal(whole(data[-1][0]), resumed(data[-1][0]))


@pytest.mark.parametrize('kind', [*CONFIGS, 'CBN'])
def test_precise_bn_on_the_fused_path(kind):
    conv = CenConv if kind == 'MABN' else nn.Conv2d
    if kind == 'CBN':
        model = conv_cbn(nn.Conv2d(3, 6, 3, bias=False))
    else:
        model = nn.Sequential(conv(3, 6, 3, bias=False), layer(kind))
    inputs = [torch.randn(2, 3, 6, 6) for _ in range(4)]
    with kernels('triton'):
        for x in inputs[:3]:
            model(x).square().mean().backward()
        before = copy.deepcopy(model.state_dict())
        precise_statistics(model, inputs, num_iters=4)
    with torch.no_grad():
        x = torch.cat([model[0](b) for b in inputs]).double()
    if kind == 'MABN':
        torch.testing.assert_close(model[1].running_var, x.square().mean((0, 2, 3)).float())
    else:
        var, mean = torch.var_mean(x, (0, 2, 3), correction=1)
        torch.testing.assert_close(model[1].running_mean, mean.float())
        torch.testing.assert_close(model[1].running_var, var.float())
    for key, value in model.state_dict().items():
        if not key.endswith(('running_mean', 'running_var')):
            assert torch.equal(value, before[key]), key


# --------------------------------------------------------- two processes
def _sync_worker(rank, port, out_dir):
    import datetime

    import torch.distributed as dist
    from test_sync_stats import WORLD, _train_ddp, tensors

    from conftest import exit_without_teardown
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    results = {'fused': paths.fused(torch.empty(1))}
    for kind in CONFIGS:
        results[kind] = tensors(_train_ddp(kind, True, rank))
    torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    exit_without_teardown()


def test_sync_stats_on_the_fused_path_equals_one_process_on_the_union(tmp_path, monkeypatch):
    """Two gloo processes under DDP with sync_stats=True and the fused path (MABN:
    the kernel split around the all-reduce; BRN's synchronised step is ATen's),
    rank 1 with an empty batch at one step, against one process on the union
    of their inputs on the ATen path (tests/layers/test_sync_stats.py)."""
    import torch.multiprocessing as mp
    from test_sync_stats import STEPS as SYNC_STEPS
    from test_sync_stats import assert_states_close, train_on_union

    from conftest import free_port
    monkeypatch.setenv(paths.KERNELS_ENV, 'triton')  # read by the spawned processes
    mp.spawn(_sync_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    assert all(rank['fused'] for rank in ranks)
    for kind in CONFIGS:
        rank0, rank1 = ranks[0][kind], ranks[1][kind]
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), (kind, key)
        with kernels('aten'):
            expected = train_on_union(kind)
        assert_states_close(rank0, expected, rtol=1e-9, atol=1e-11)
        assert int(rank0['1.num_batches_tracked']) == SYNC_STEPS


# ------------------------------------------------- launches and host reads
def counted(module, shape=(2, 64, 4, 4)):
    """(forward, backward) operators + Triton launches of one training step
    after three, on the fused path."""
    x = torch.randn(shape, requires_grad=True)
    grad_for = incoming_grad(torch.randn(shape))
    with kernels('triton'):
        for _ in range(3):
            module(x).backward(grad_for(x))
        return ops_per_step(module, x, grad_for, forward_context(x.device, 'float32'))


def test_launches_per_step_meet_the_targets():
    def conv(cls):
        return cls(64, 64, 3, padding=1, bias=False)

    bn = sum(counted(nn.BatchNorm2d(64)))
    conv_bn = sum(counted(nn.Sequential(conv(nn.Conv2d), nn.BatchNorm2d(64))))
    found = {'MABN': sum(counted(MABN(64))), 'BRN': sum(counted(BRN(64))),
             'CenConv + MABN': sum(counted(nn.Sequential(conv(CenConv), MABN(64)))),
             'conv + CBN': sum(counted(nn.Sequential(conv(nn.Conv2d), CBN(64))))}
    assert (bn, conv_bn) == (7, 10)  # PyTorch's own, the yardstick
    targets = {'MABN': 10, 'BRN': 10, 'CenConv + MABN': 18, 'conv + CBN': 18}
    assert all(found[name] <= target for name, target in targets.items()), found


class FailOnHostRead(TorchDispatchMode):
    """Raises at ``aten._local_scalar_dense``: a device value read on the host
    (``.item()``, ``bool()``, ``int()``...), a synchronisation on a GPU."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError('a training step read a device value on the host')
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('kind', CONFIGS)
def test_fused_steps_read_nothing_on_the_host(kind):
    norm = layer(kind)
    data = batches((2, 6, 3, 3))
    x, dy = data[0]
    x = x.clone()
    x[0, 0, 0, 0] = float('nan')  # the non-finite note is taken on the device too
    data[0] = (x, dy)
    with kernels('triton'), FailOnHostRead():
        for x, dy in data:  # crosses every phase
            norm(x.requires_grad_()).backward(dy)
    assert int(norm.num_batches_tracked) == STEPS
    with pytest.raises(AssertionError, match='read a device value'), FailOnHostRead():
        norm.report_nonfinite()  # the mode sees reads: the one at report time


# -------------------------------------------------------------- compiling
@pytest.mark.parametrize('kind', CONFIGS)
def test_one_compiled_block_serves_ten_fused_layers(kind):
    from test_compile import count_compiled_frames
    with kernels('triton'):
        frames = count_compiled_frames(lambda: layer(kind, channels=8))
    assert frames == 1


# --------------------------------------------------------- the choice
def test_choice_of_path_and_its_errors(monkeypatch):
    cpu, cuda = torch.empty(1), torch.empty(1, device='meta')
    with kernels('aten'):
        assert not paths.fused(cpu)
    with kernels('triton'):
        assert paths.fused(cpu)
    monkeypatch.delenv('TRITON_INTERPRET')
    with kernels('triton'):
        with pytest.raises(RuntimeError, match='TRITON_INTERPRET=1'):
            paths.fused(cpu)
        with pytest.raises(RuntimeError, match='TRITON_INTERPRET=1'):
            MABN(4)(torch.randn(2, 4, 3, 3))
    assert 'CUDA tensors take the fused Triton kernels' in paths.select('auto')
    assert not paths.fused(cpu) and not paths.fused(cuda)
    with pytest.raises(ValueError, match="MMNORM_KERNELS='fast'"):
        paths.select('fast')
    paths.select()


def test_every_kernel_compiles_ahead_of_time_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    done = subprocess.run([sys.executable, str(ROOT / 'tools' / 'compile_kernels.py'),
                           '--arch', '80', '90'], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'compiled 0' not in done.stdout and 'sm_90' in done.stdout, done.stdout


def test_every_fused_layer_is_covered():
    # a registered layer with a fused step and no parametrisation here fails
    from mmnorm.layers import norm_types
    fused = {name for name, cls in norm_types().items() if cls.FUSED_STEP}
    assert fused and fused <= set(CONFIGS) | {'CBN'}
