"""The layers under activation checkpointing (torch.utils.checkpoint, MMDetection's
with_cp): a forward recomputed during the backward replays its step, so a
checkpointed model trains exactly as the same model without checkpointing
(docs/layer_state.md, "Activation checkpointing")."""
import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmnorm import BRN, CBN, MABN, CenConv, WSConv
from mmnorm.layers import paths

F64 = torch.float64
STEPS = 6
# Settings that cross every phase in 6 steps: MABN's window (2) fills and r
# leaves 1 after 3; BRN's bounds open from 1 to 3; CBN's window grows over a
# gradual burn-in of 3 steps, then pools and compensates with a moving conv.
NORMS = {
    'MABN': lambda: MABN(6, buffer_size=2, warmup_iters=2, renorm_start_iter=3),
    'BRN': lambda: BRN(6, warmup_iters=1, rmax_iters=3, dmax_iters=3),
    'CBN': lambda: CBN(6, buffer_num=2, burnin=3, two_stage=False),
    'BatchNorm2d': lambda: nn.BatchNorm2d(6),
}
CONVS = {'conv': nn.Conv2d, 'CenConv': CenConv, 'WSConv': WSConv}
LAYERS = [('conv', 'MABN'), ('CenConv', 'MABN'), ('conv', 'BRN'), ('WSConv', 'BRN'),
          ('conv', 'CBN'), ('CenConv', 'CBN')]
FUSED = paths.triton_problem() is None and __import__('os').environ.get(
    'TRITON_INTERPRET') == '1'


def block(conv, norm, dtype=F64):
    torch.manual_seed(0)
    return nn.Sequential(CONVS[conv](3, 6, 3, padding=1), NORMS[norm](), nn.ReLU()).to(dtype)


@contextlib.contextmanager
def path(name):
    paths.select(name)
    try:
        yield
    finally:
        paths.select()


def train_both(conv, norm, reentrant, steps=STEPS, dtype=F64, autocast=None):
    """Train a block and a checkpointed copy on the same batches with SGD;
    returns (plain, checkpointed, worst gradient gap relative to the largest
    gradient entry, loss gaps)."""
    plain = block(conv, norm, dtype)
    checkpointed = copy.deepcopy(plain)
    gen = torch.Generator().manual_seed(1)
    worst, losses = 0.0, []
    for _ in range(steps):
        x = torch.randn(2, 3, 5, 5, generator=gen, dtype=dtype).requires_grad_()
        results = []
        for model, wrap in ((plain, False), (checkpointed, True)):
            model.zero_grad()
            context = (torch.autocast('cpu', dtype=autocast) if autocast
                       else contextlib.nullcontext())
            with context:
                y = checkpoint(model, x, use_reentrant=reentrant) if wrap else model(x)
            loss = y.float().square().mean() if autocast else y.square().mean()
            loss.backward()
            results.append(float(loss.detach()))
        losses.append(abs(results[0] - results[1]))
        # relative to the model's largest gradient entry: the conv bias's
        # gradient behind a mean-subtracting norm is rounding noise (~1e-17)
        scale = max(float(p.grad.abs().max()) for p in plain.parameters())
        for p, q in zip(plain.parameters(), checkpointed.parameters()):
            worst = max(worst, float((p.grad - q.grad).abs().max()) / scale)
        with torch.no_grad():
            for p, q in zip(plain.parameters(), checkpointed.parameters()):
                p.sub_(0.1 * p.grad)
                q.copy_(p)
    return plain, checkpointed, worst, losses


def assert_same_buffers(plain, checkpointed, rtol):
    for (name, a), b in zip(plain.named_buffers(), checkpointed.buffers()):
        assert a.shape == b.shape, name
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=rtol, atol=rtol, msg=name)
        else:
            assert torch.equal(a, b), name


MODES = [pytest.param(True, id='reentrant'), pytest.param(False, id='non_reentrant')]
PATHS = ['aten', pytest.param('triton', marks=pytest.mark.skipif(
    not FUSED, reason='the fused path on the CPU needs Triton and TRITON_INTERPRET=1'))]


@pytest.mark.parametrize('kernels', PATHS)
@pytest.mark.parametrize('reentrant', MODES)
@pytest.mark.parametrize('conv, norm', LAYERS, ids=[f'{c}+{n}' for c, n in LAYERS])
def test_checkpointed_training_equals_plain_training(conv, norm, reentrant, kernels):
    with path(kernels), warnings.catch_warnings():
        warnings.simplefilter('error', RuntimeWarning)  # nothing to warn about
        plain, checkpointed, worst, losses = train_both(conv, norm, reentrant)
    assert worst <= 1e-10 and max(losses) <= 1e-10, (worst, losses)
    assert_same_buffers(plain, checkpointed, 1e-10)
    assert int(checkpointed[1].num_batches_tracked) == STEPS  # one step per step


def test_batch_norm_updates_twice_under_checkpointing():
    # PyTorch's own layer, for the table in docs/layer_state.md: the
    # recomputed forward is a second step (gradients exact, statistics not).
    for reentrant in (True, False):
        plain, checkpointed, worst, _ = train_both('conv', 'BatchNorm2d', reentrant)
        assert worst <= 1e-10
        assert int(checkpointed[1].num_batches_tracked) == 2 * STEPS
        assert not torch.allclose(plain[1].running_var, checkpointed[1].running_var)


@pytest.mark.parametrize('conv', ['conv', 'CenConv'])
def test_cbn_resumed_under_reentrant_checkpointing(conv):
    # A copy (as a resumed process has) has not learnt its conv: the first
    # reentrant step after it pools without compensation, once, with a warning;
    # its recompute learns the conv, and the next steps compensate.
    plain, _, _, _ = train_both(conv, 'CBN', False, steps=4)
    resumed = copy.deepcopy(plain)
    gen = torch.Generator().manual_seed(5)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter('always')
        for step in range(3):
            x = torch.randn(2, 3, 5, 5, generator=gen, dtype=F64, requires_grad=True)
            outputs = []
            for model, wrap in ((plain, False), (resumed, True)):
                model.zero_grad()
                y = checkpoint(model, x, use_reentrant=True) if wrap else model(x)
                y.square().mean().backward()
                outputs.append(y.detach())
            gap = float((outputs[0] - outputs[1]).abs().max())
            assert (gap > 1e-6) if step == 0 else (gap <= 1e-10), (step, gap)
            with torch.no_grad():
                for p, q in zip(plain.parameters(), resumed.parameters()):
                    p.sub_(0.1 * p.grad)
                    q.copy_(p)
    found = [str(r.message) for r in records if 'without the Taylor compensation' in
             str(r.message)]
    assert len(found) == 1 and found[0].startswith('CBN'), found
    assert int(resumed[1].history_pushes) == int(plain[1].history_pushes)


def test_a_cbn_step_without_gradients_is_a_plain_step():
    # outside checkpointing, a no_grad training forward keeps its meaning:
    # a step (counter, running statistics) that neither pools nor pushes
    plain, _, _, _ = train_both('conv', 'CBN', False, steps=4)
    pushes = int(plain[1].history_pushes)
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    with torch.no_grad():
        y = plain(x)
        expected = nn.functional.relu(nn.functional.batch_norm(
            plain[0](x), None, None, plain[1].weight, plain[1].bias, True, 0.0, plain[1].eps))
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert int(plain[1].history_pushes) == pushes
    assert int(plain[1].num_batches_tracked) == 5


@pytest.mark.parametrize('norm', ['MABN', 'BRN'])
def test_checkpointed_training_under_autocast(norm):
    plain, checkpointed, worst, losses = train_both('conv', norm, False, dtype=torch.float32,
                                                    autocast=torch.bfloat16)
    assert worst <= 1e-6 and max(losses) <= 1e-6, (worst, losses)
    assert_same_buffers(plain, checkpointed, 1e-6)


def test_a_forward_without_gradients_is_still_a_step():
    layer = block('conv', 'MABN')
    with torch.no_grad():
        for _ in range(3):
            layer(torch.randn(2, 3, 5, 5, dtype=F64))
    assert int(layer[1].num_batches_tracked) == 3


def test_replays_are_matched_by_input_shape():
    # a shared head: one layer called on two levels of different sizes, each
    # call checkpointed; the backward replays them in reverse order
    torch.manual_seed(0)
    head = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), MABN(6, buffer_size=2, warmup_iters=1,
                                                             renorm_start_iter=1)).double()
    twin = copy.deepcopy(head)
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        levels = [torch.randn(2, 3, s, s, generator=gen, dtype=F64) for s in (8, 4)]
        sum(head(x).square().mean() for x in levels).backward()
        sum(checkpoint(twin, x, use_reentrant=False).square().mean() for x in levels).backward()
    for p, q in zip(head.parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)
    assert_same_buffers(head, twin, 1e-10)


@pytest.mark.parametrize('depth, extra', [(18, {}), (50, dict(groups=4, base_width=4))],
                         ids=['ResNet-18', 'ResNeXt-50'])
@pytest.mark.parametrize('norm', ['MABN', 'BRN', 'CBN'])
def test_mmdet_backbones_with_cp_train_exactly(depth, extra, norm):
    backbones = pytest.importorskip('mmdet.models.backbones')
    cls = backbones.ResNeXt if extra else backbones.ResNet
    cfg = dict(depth=depth, num_stages=2, strides=(1, 2), dilations=(1, 1), out_indices=(1,),
               norm_eval=False, frozen_stages=-1,
               norm_cfg=dict(type=norm, requires_grad=True), **extra)
    torch.manual_seed(0)
    plain, checkpointed = cls(**cfg).double(), cls(**cfg, with_cp=True).double()
    checkpointed.load_state_dict(plain.state_dict())
    plain.train()  # (mmdet's ResNet.train returns None)
    checkpointed.train()
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(1, 3, 32, 32, generator=gen, dtype=F64, requires_grad=True)
        for model in (plain, checkpointed):
            model.zero_grad()
            model(x)[0].square().mean().backward()
        for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
    assert_same_buffers(plain, checkpointed, 1e-10)


@pytest.fixture
def one_process_sync(monkeypatch, tmp_path):
    """sync_stats taken in one gloo process (the collectives then change
    nothing), counting the collectives called."""
    import torch.distributed as dist

    from mmnorm.layers import base
    if not dist.is_available():
        pytest.skip('torch.distributed is not available')
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0,
                            world_size=1)
    calls = []
    for name in ('all_reduce', 'all_gather'):
        original = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda *a, _f=original, _n=name, **k: (
            calls.append(_n), _f(*a, **k))[1])
    monkeypatch.setattr(base, 'sync_world', lambda: True)
    try:
        yield calls
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('reentrant', MODES)
@pytest.mark.parametrize('norm', ['MABN', 'BRN', 'CBN'])
def test_a_replay_takes_no_collective(norm, reentrant, one_process_sync):
    calls = one_process_sync
    layers = {'MABN': lambda: MABN(6, buffer_size=2, warmup_iters=2, sync_stats=True),
              'BRN': lambda: BRN(6, warmup_iters=1, rmax_iters=3, dmax_iters=3, sync_stats=True),
              'CBN': lambda: CBN(6, buffer_num=2, burnin=0, sync_stats=True)}
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), layers[norm]()).double()
    checkpointed = copy.deepcopy(plain)
    gen = torch.Generator().manual_seed(4)
    # a throwaway step first: the fused path tries a variant's first step on a
    # copy (more collectives, once per process), which the counts leave out
    copy.deepcopy(plain)(torch.randn(2, 3, 5, 5, dtype=F64)).sum().backward()
    counts = []
    for _ in range(3):
        x = torch.randn(2, 3, 5, 5, generator=gen, dtype=F64, requires_grad=True)
        for model, wrap in ((plain, False), (checkpointed, True)):
            model.zero_grad()
            del calls[:]
            y = checkpoint(model, x, use_reentrant=reentrant) if wrap else model(x)
            y.square().mean().backward()
            counts.append(len(calls))
        for p, q in zip(plain.parameters(), checkpointed.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)
    assert counts[0::2] == counts[1::2] and counts[0] > 0, counts
    assert_same_buffers(plain, checkpointed, 1e-10)


def test_every_registered_layer_is_covered():
    from mmnorm.layers import conv_types, norm_types
    assert set(norm_types()) <= {norm for _, norm in LAYERS}
    assert set(conv_types()) <= set(CONVS)


def test_records_do_not_pile_up_with_new_input_sizes():
    # multi-scale training: a new input size every step, never replayed
    layer = MABN(6).train()
    for size in range(4, 44):
        layer(torch.randn(1, 6, size, size))
    assert len(layer._replays) == layer.REPLAYS_KEPT
    assert layer._replays[-1][0][0] == (1, 6, 43, 43)  # the newest kept
