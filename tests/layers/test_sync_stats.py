"""Many processes (README, "Many processes"; docs/layer_state.md):
``sync_stats`` and mmengine's SyncBuffersHook.

Two CPU processes (gloo) are started once for the module (``ddp_results``);
they train small conv + norm stacks and write what they saw to files, which the
tests compare against a single process computed here.

Equality with a single process: under DDP each process backpropagates its own
loss L_r and DDP averages the parameter gradients, i.e. DDP follows
(1 / W) * grad(sum_r L_r). The single-process reference sees the
concatenation of the processes' inputs, backpropagates sum_r L_r (each L_r on
its slice of the output) and divides the gradients by W before the same SGD
step. Its parameter updates are DDP's, and every statistic the layers store
(MABN's psi_t too, which is linear in the incoming gradient) is the one of
the union of the processes' inputs.
"""
import datetime
import math
import os
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mmnorm.layers import BRN, CBN, MABN, CenConv

from conftest import exit_without_teardown

F64 = torch.float64
WORLD = 2
STEPS = 10
LR = 0.05
KINDS = ('MABN', 'CBN', 'BRN')
# Per step, the batch size of each rank: different sizes, and at step 6 an
# empty input on rank 1 (it must still take part, and not block rank 0).
SIZES = [(2, 3)] * 6 + [(2, 0)] + [(1, 2)] * (STEPS - 7)
# Schedules that the 10 steps cross: MABN's window (3) fills, warm-up ends and
# r leaves 1 after t = 4; CBN's burn-in ends after t = 2; BRN's r and d bounds
# open after t = 2.
LAYER_CFG = dict(
    MABN=dict(buffer_size=3, warmup_iters=2, renorm_start_iter=4),
    CBN=dict(buffer_num=2, burnin=2),
    BRN=dict(momentum=0.1, warmup_iters=2, rmax_iters=5, dmax_iters=5),
)
LAYER = dict(MABN=MABN, CBN=CBN, BRN=BRN)


def build(kind, sync_stats):
    """conv -> norm -> ReLU -> conv -> norm, float64, the same weights for a
    given kind (CenConv in front of MABN, nn.Conv2d otherwise)."""
    torch.manual_seed(0)
    conv = CenConv if kind == 'MABN' else nn.Conv2d
    norm = LAYER[kind]
    cfg = dict(LAYER_CFG[kind], sync_stats=sync_stats)
    model = nn.Sequential(conv(3, 4, 3, padding=1), norm(4, **cfg), nn.ReLU(),
                          conv(4, 4, 3, padding=1), norm(4, **cfg)).to(F64)
    with torch.no_grad():
        for layer in (model[1], model[4]):
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_()
    return model


def batch(step, rank, n):
    """Rank ``rank``'s input and loss weights at ``step`` (the loss is
    sum(y * weights)); ranks differ in scale and offset."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(n, 3, 5, 5, generator=gen, dtype=F64) * (1 + rank) + 2 * rank
    return x, torch.randn(n, 4, 5, 5, generator=gen, dtype=F64)


def norm_layers(model):
    return [m for m in model.modules() if isinstance(m, (MABN, CBN, BRN))]


def tensors(module):
    """Every parameter and buffer, by name, cloned."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------- the workers
def _train_ddp(kind, sync_stats, rank):
    from torch.nn.parallel import DistributedDataParallel
    model = build(kind, sync_stats)
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
    for step, sizes in enumerate(SIZES):
        x, weights = batch(step, rank, sizes[rank])
        (ddp(x) * weights).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def _empty_union_step(model):
    """Both ranks call the model with an empty input (train mode, with a
    backward): returns the state before and after and the warnings."""
    before = tensors(model)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter('always')
        y = model(torch.zeros(0, 3, 5, 5, dtype=F64))
        y.sum().backward()
    return dict(before=before, after=tensors(model), shape=tuple(y.shape),
                warnings=[str(w.message) for w in records])


def _hook_scenario(kind, rank):
    """Per-rank statistics (sync_stats=False, no DDP: weights stay equal),
    then SyncBuffersHook, with equal and then unequal step counters."""
    from mmengine.hooks import SyncBuffersHook
    model = build(kind, sync_stats=False)
    out = {}

    def step(seed, x_override=None):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 3, 5, 5, generator=gen, dtype=F64) * (1 + rank) + rank
        if x_override is not None:
            x = x_override(x)
        y = model(x)
        (y * torch.randn(y.shape, generator=gen, dtype=F64)).sum().backward()
        return y.detach()

    def poison(x):  # rank 1, one step: a non-finite statistic in every layer
        x[0, :, 2, 2] = math.inf
        return x

    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)
        for i in range(6):
            step(100 * i + rank, poison if (rank == 1 and i == 4) else None)
    hook = SyncBuffersHook()
    runner = SimpleNamespace(model=model)
    out['equal_before'] = tensors(model)
    hook.after_train_epoch(runner)
    out['equal_after'] = tensors(model)
    # Rank 0 takes one more step: the counters now differ by one.
    if rank == 0:
        step(900)
    out['unequal_before'] = tensors(model)
    hook.after_train_epoch(runner)
    out['unequal_after'] = tensors(model)
    model.train()  # as mmengine's loops do at the start of an epoch or iteration
    out['next_y'] = step(1000 + rank)
    out['next_state'] = tensors(model)
    # Large equal counters survive the hook's float32 division (W * t < 2**24).
    for layer in norm_layers(model):
        layer.num_batches_tracked.fill_(5_000_001)
    hook.after_train_epoch(runner)
    out['large_counters'] = [int(layer.num_batches_tracked) for layer in norm_layers(model)]
    return out


def _worker(rank, port, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    results = {}
    for kind in KINDS:
        for sync_stats in (True, False):
            model = _train_ddp(kind, sync_stats, rank)
            results[kind, sync_stats] = tensors(model)
            if sync_stats:
                results[kind, 'empty'] = _empty_union_step(model)
        results[kind, 'hook'] = _hook_scenario(kind, rank)
    torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    exit_without_teardown()


@pytest.fixture(scope='module')
def ddp_results(tmp_path_factory):
    import torch.multiprocessing as mp

    from conftest import free_port
    out_dir = tmp_path_factory.mktemp('sync_stats')
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD)
    return [torch.load(out_dir / f'rank{r}.pt') for r in range(WORLD)]


# ------------------------------------------------------- single process
def train_on_union(kind):
    """The single-process reference (see the module docstring)."""
    model = build(kind, sync_stats=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step, sizes in enumerate(SIZES):
        inputs = [batch(step, rank, n) for rank, n in enumerate(sizes)]
        y = model(torch.cat([x for x, _ in inputs]))
        loss = sum((part * w).sum() for part, (_, w) in zip(y.split(sizes), inputs))
        loss.backward()
        for p in model.parameters():
            p.grad /= WORLD
        optimizer.step()
        optimizer.zero_grad()
    return tensors(model)


def assert_states_close(actual, expected, **tol):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(actual[key], value, msg=key, **tol)
        else:
            assert torch.equal(actual[key], value), key


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.xdist_group('sync_stats_ddp')
def test_sync_stats_ranks_agree_and_equal_one_process_on_the_union(ddp_results, kind):
    rank0, rank1 = (r[kind, True] for r in ddp_results)
    for key in rank0:  # identical buffers (and weights) on both ranks
        assert torch.equal(rank0[key], rank1[key]), key
    expected = train_on_union(kind)
    assert_states_close(rank0, expected, rtol=1e-9, atol=1e-11)
    # every step counted on both ranks, rank 1's empty step included
    for name, value in expected.items():
        if name.endswith('num_batches_tracked'):
            assert int(value) == STEPS
    # the training moved the statistics away from their initial values
    for name in ('1.running_var', '4.running_var'):
        assert not torch.allclose(rank0[name], torch.ones(4, dtype=F64))


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.xdist_group('sync_stats_ddp')
def test_without_sync_stats_each_rank_keeps_its_own_buffers(ddp_results, kind):
    rank0, rank1 = (r[kind, False] for r in ddp_results)
    for key in rank0:
        if key.split('.')[-1] in ('weight', 'bias'):  # parameters: DDP's averaged gradients
            torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
    # rank 1 skipped its empty step: without sync it does not count it
    assert int(rank0['1.num_batches_tracked']) == STEPS
    assert int(rank1['1.num_batches_tracked']) == STEPS - 1
    statistic = '1.buffer_x2' if kind == 'MABN' else '1.running_mean'
    assert not torch.allclose(rank0[statistic], rank1[statistic])


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.xdist_group('sync_stats_ddp')
def test_sync_stats_empty_union_stores_nothing_and_advances_every_counter(ddp_results, kind):
    for result in ddp_results:
        res = result[kind, 'empty']
        assert res['shape'] == (0, 4, 5, 5)
        assert res['warnings'] == []
        before, after = res['before'], res['after']
        for key, value in before.items():
            if key.endswith(('num_batches_tracked', 'history_pushes')):
                assert int(after[key]) == int(value) + 1, key
            elif kind == 'CBN' and key.endswith('history_valid'):
                changed = (after[key] != value).any(1)
                assert changed.sum() == 1 and not after[key][changed].any(), key
            elif kind == 'CBN' and key.startswith(('1.history', '4.history')):
                continue  # the invalid entry's numbers are never read
            else:
                assert torch.equal(after[key], value), key


def test_sync_stats_without_a_process_group_changes_nothing():
    import torch.distributed as dist
    assert not dist.is_initialized()
    for kind in KINDS:
        states, outputs = [], []
        for sync_stats in (False, True):
            model = build(kind, sync_stats)
            ys = []
            for step in range(4):
                x, weights = batch(step, 0, 2)
                y = model(x)
                (y * weights).sum().backward()
                ys.append(y.detach())
            states.append(tensors(model))
            outputs.append(torch.stack(ys))
        assert torch.equal(outputs[0], outputs[1]), kind
        assert_states_close(states[1], states[0], rtol=0, atol=0)


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('value', [1, 'yes', None])
def test_sync_stats_must_be_a_bool(kind, value):
    with pytest.raises(TypeError, match=f'{kind}: sync_stats must be a bool'):
        LAYER[kind](4, sync_stats=value)
    assert 'sync_stats=True' in repr(LAYER[kind](4, sync_stats=True))


# ---------------------------------------------------------- SyncBuffersHook
@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.xdist_group('sync_stats_ddp')
def test_sync_buffers_hook_with_equal_counters_averages_into_a_valid_state(ddp_results, kind):
    results = [r[kind, 'hook'] for r in ddp_results]
    before = [r['equal_before'] for r in results]
    for res in results:
        after = res['equal_after']
        for key, value in before[0].items():
            other = before[1][key]
            if key.endswith(('num_batches_tracked', 'history_pushes')):
                assert int(value) == int(other) == int(after[key]) > 0, key  # unchanged
            elif key.endswith('history_valid'):
                # 1 only where the entry was valid on both ranks
                assert torch.equal(after[key], torch.minimum(value, other)), key
            else:
                # weights were equal; buffers (rows aligned) are averaged
                torch.testing.assert_close(after[key], (value + other) / 2, rtol=1e-15,
                                           atol=0, msg=key)
    if kind == 'CBN':
        # rank 1's poisoned step left invalid entries; after the hook they are
        # invalid everywhere, so the halved numbers stored there are never used
        valid = [b['1.history_valid'] for b in before]
        assert valid[0].all() and not valid[1].all()
        assert not results[0]['equal_after']['1.history_valid'].all()


@pytest.mark.parametrize('kind', KINDS)
def test_sync_buffers_hook_with_unequal_counters_then_training_continues_consistently(
        ddp_results, kind):
    results = [r[kind, 'hook'] for r in ddp_results]
    t = [int(r['unequal_before']['1.num_batches_tracked']) for r in results]
    assert t[0] == t[1] + 1
    for res in results:
        after = res['unequal_after']
        assert int(after['1.num_batches_tracked']) == t[1]  # the truncated mean
        assert after.keys() == results[0]['unequal_after'].keys()
        for key, value in after.items():
            assert torch.equal(value, results[0]['unequal_after'][key]), key
    # The layer that went on training equals a fresh one loaded from the
    # averaged state: nothing the layer kept on the host is stale.
    for rank, res in enumerate(results):
        model = build(kind, sync_stats=False)
        model.load_state_dict(res['unequal_after'])
        gen = torch.Generator().manual_seed(1000 + rank)
        x = torch.randn(2, 3, 5, 5, generator=gen, dtype=F64) * (1 + rank) + rank
        y = model(x)
        (y * torch.randn(y.shape, generator=gen, dtype=F64)).sum().backward()
        assert torch.equal(y.detach(), res['next_y'])
        assert_states_close(tensors(model), res['next_state'], rtol=0, atol=0)


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.xdist_group('sync_stats_ddp')
def test_sync_buffers_hook_keeps_large_equal_counters(ddp_results, kind):
    for result in ddp_results:
        assert result[kind, 'hook']['large_counters'] == [5_000_001, 5_000_001]


def test_every_registered_layer_is_covered():
    from mmnorm.layers import norm_types
    assert set(norm_types()) <= set(KINDS)
