"""torch.compile sees the layers whole: no graph break in a training or eval
step (CBN apart, which runs outside the graph with the conv that feeds it),
compiled equals eager, and the layers' guarantees hold compiled."""
import copy
import io
import subprocess
import sys

import pytest
import torch
from torch import nn

from mmnorm import BRN, CBN, MABN, CenConv, WSConv
from mmnorm._torch import CUSTOM_OPS
from mmnorm.surgery.compile import keep_cbn_convs_eager

pytestmark = pytest.mark.skipif(
    not CUSTOM_OPS, reason=f'torch {torch.__version__} has no torch.library.custom_op (2.4): '
    'compiled models break the graph at the layers there')

# Compiled graphs reorder and fuse float32 arithmetic: results agree to rounding.
TOLERANCE = dict(rtol=1e-4, atol=1e-5)
# Inductor also reorders the reductions; over 6 momentum-SGD steps of a
# network, BRN's r and d (ratios of statistics) amplify that to ~2e-4.
NETWORK_TOLERANCE = dict(rtol=1e-3, atol=1e-4)


def block(kind, channels=8):
    """conv -> norm, as in a ResNet stage, with schedules short enough that
    every phase (warm-up, moving averages, renormalisation) runs in 8 steps."""
    conv = nn.Conv2d(3, channels, 3, padding=1, bias=False)
    if kind == 'MABN':
        return nn.Sequential(CenConv(3, channels, 3, padding=1, bias=False),
                             MABN(channels, buffer_size=2, warmup_iters=3, renorm_start_iter=4))
    if kind == 'BRN':
        return nn.Sequential(conv, BRN(channels, warmup_iters=2, rmax_iters=5, dmax_iters=4))
    if kind == 'CBN':
        return nn.Sequential(conv, CBN(channels, buffer_num=2))
    if kind == 'WSConv':
        return nn.Sequential(WSConv(3, channels, 3, padding=1, bias=False),
                             nn.GroupNorm(2, channels))
    return nn.Sequential(conv, nn.BatchNorm2d(channels))


KINDS = ['MABN', 'BRN', 'CBN', 'WSConv']


def loss_of(model, x):
    return model(x).square().mean()


def graph_breaks(function, *args):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(function)(*args)
    return explained.graph_break_count, [r.reason.splitlines()[0] for r in explained.break_reasons]


@pytest.mark.parametrize('kind', ['MABN', 'BRN', 'WSConv'])
def test_training_and_eval_steps_have_no_graph_break(kind):
    model = block(kind)
    x = torch.randn(2, 3, 6, 6)
    for _ in range(5):  # past MABN's window fill and warm-up, BRN's too
        loss_of(model, x).backward()
    assert graph_breaks(loss_of, model, x) == (0, [])
    assert graph_breaks(loss_of, model.eval(), x) == (0, [])


def test_cbn_breaks_only_at_itself_and_has_no_process_wide_effect():
    # A model without CBN compiles exactly as without mmnorm: built after a CBN
    # has trained in the same process, it has no graph break (a process-wide
    # forward hook used to break every conv).
    model = block('CBN')
    loss_of(model, torch.randn(2, 3, 6, 6)).backward()
    assert graph_breaks(loss_of, block('BN'), torch.randn(2, 3, 6, 6)) == (0, [])
    assert not torch.nn.modules.module._global_forward_hooks
    # Around the CBN: the conv that feeds it and its training step run outside
    # the graph (breaks at torch.compiler.disable only), the rest inside.
    net = Stage()
    assert keep_cbn_convs_eager(net) == ['conv']
    count, reasons = graph_breaks(loss_of, net, torch.randn(2, 3, 6, 6))
    assert count >= 1 and all('disable' in reason for reason in reasons), reasons


def count_compiled_frames(make_norm, layers=10, steps=2):
    """Frames dynamo compiles for one bottleneck-like block forward that ``layers``
    conv -> norm pairs share (``make_norm()`` builds each norm), trained for
    ``steps`` steps each. A per-layer Python value reaching the graph (a guard)
    would compile it once per layer, up to the recompile limit."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    pairs = [nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), make_norm())
             for _ in range(layers)]

    @torch.compile(backend='aot_eager')
    def block(pair, x):
        return torch.relu(pair(x) + x)

    x = torch.randn(2, 8, 5, 5)
    for _ in range(steps):
        for pair in pairs:
            block(pair, x).square().mean().backward()
    return counters['stats']['unique_graphs']


@pytest.mark.parametrize('kind', ['BN', 'MABN', 'BRN'])
def test_one_compiled_block_serves_ten_layers(kind):
    make = dict(BN=lambda: nn.BatchNorm2d(8), MABN=lambda: MABN(8, buffer_size=2),
                BRN=lambda: BRN(8, warmup_iters=1, rmax_iters=3, dmax_iters=3))[kind]
    assert count_compiled_frames(make) == 1


class Stage(nn.Module):
    """conv -> CBN in a forward without a loop, so dynamo resumes after a break."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, bias=False), CBN(8)

    def forward(self, x):
        return self.bn(self.conv(x * 2)).relu()


def test_cbn_fed_by_a_compiled_conv_says_what_to_do():
    compiled = torch.compile(loss_of, backend='aot_eager')
    with pytest.raises(RuntimeError, match=r'torch.compile graph.*keep_cbn_convs_eager'):
        compiled(Stage(), torch.randn(2, 3, 6, 6))
    stage = Stage()
    assert keep_cbn_convs_eager(stage) == ['conv']
    compiled(stage, torch.randn(2, 3, 6, 6)).backward()
    assert int(stage.bn.history_pushes) == 1


def train(model, step, inputs, lr=0.1):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for x in inputs:
        loss = step(model, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


def assert_same_state(model, reference, tolerance=TOLERANCE):
    for (key, value), (_, expected) in zip(model.state_dict().items(),
                                           reference.state_dict().items()):
        torch.testing.assert_close(value, expected, **tolerance, msg=lambda m: f'{key}: {m}')


def train_both(eager, inputs, backend, lr=0.1, tolerance=TOLERANCE):
    """Train ``eager`` and a compiled copy of it on ``inputs`` (momentum SGD);
    assert equal losses and states; return the copy and its compiled step."""
    compiled = copy.deepcopy(eager)
    keep_cbn_convs_eager(compiled)
    torch._dynamo.reset()
    step = torch.compile(loss_of, backend=backend)
    torch.testing.assert_close(train(compiled, step, inputs, lr=lr),
                               train(eager, loss_of, inputs, lr=lr), **tolerance)
    assert_same_state(compiled, eager, tolerance)
    return compiled, step


@pytest.mark.parametrize('kind', KINDS)
def test_compiled_equals_eager_over_training_steps(kind):
    torch.manual_seed(0)
    eager = block(kind)
    compiled, step = train_both(eager, [torch.randn(2, 3, 6, 6) for _ in range(8)], 'aot_eager')
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(step(compiled.eval(), x), loss_of(eager.eval(), x), **TOLERANCE)


class SmallResNet(nn.Module):
    """A stem and two residual blocks, every conv followed by the norm."""

    def __init__(self, kind):
        super().__init__()
        self.stem = block(kind)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(a=block(kind), b=block(kind))) for _ in range(2))
        for stage in self.blocks:  # 8 -> 8 channels inside the blocks
            for part in stage.values():
                conv = part[0]
                part[0] = type(conv)(8, 8, 3, padding=1, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x).relu()
        for stage in self.blocks:
            x = (x + stage['b'](stage['a'](x).relu())).relu()
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize('kind', KINDS)
def test_small_resnet_with_inductor_equals_eager(kind):
    torch.manual_seed(1)
    train_both(SmallResNet(kind), [torch.randn(2, 3, 8, 8) for _ in range(6)], 'inductor',
               lr=0.02, tolerance=NETWORK_TOLERANCE)


@pytest.mark.parametrize('kind', ['MABN', 'BRN', 'CBN'])
def test_compiled_non_finite_guard_warns_and_keeps_buffers(kind):
    model = block(kind)
    keep_cbn_convs_eager(model)
    torch._dynamo.reset()
    step = torch.compile(loss_of, backend='aot_eager')
    step(model, torch.randn(2, 3, 6, 6)).backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = torch.randn(2, 3, 6, 6)
    bad[:, 0] = float('nan')  # every output channel of the conv sees the NaN
    with pytest.warns(RuntimeWarning, match='inf or NaN'):
        step(model, bad)
        model.train()  # reads the flag the compiled step set
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key
            if key.endswith('running_var'):
                torch.testing.assert_close(value, before[key])
    step(model, torch.randn(2, 3, 6, 6)).backward()  # the next step trains


@pytest.mark.parametrize('kind', KINDS)
def test_compiled_resume_continues_exactly(kind):
    torch.manual_seed(2)
    inputs = [torch.randn(2, 3, 6, 6) for _ in range(6)]
    torch._dynamo.reset()
    step = torch.compile(loss_of, backend='aot_eager')
    whole = block(kind)
    first = copy.deepcopy(whole)
    keep_cbn_convs_eager(whole)
    keep_cbn_convs_eager(first)
    expected = train(whole, step, inputs)
    train(first, step, inputs[:3])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = block(kind)
    keep_cbn_convs_eager(resumed)
    with torch.no_grad():  # the optimizer restarts, so compare with the same restart
        resumed.load_state_dict(torch.load(buffer))
    again = copy.deepcopy(first)
    torch.testing.assert_close(train(resumed, step, inputs[3:]), train(again, step, inputs[3:]),
                               rtol=0, atol=0)
    assert_same_state(resumed, again)
    assert expected.shape == (6,)


def test_plain_model_compiles_as_without_mmnorm():
    # In a fresh process: the graphs of a conv + BatchNorm model are the same
    # whether or not mmnorm was imported and a CBN trained.
    code = '''
import sys, torch
from torch import nn
if sys.argv[1] == 'with':
    import mmnorm
    m = nn.Sequential(nn.Conv2d(3, 4, 3), mmnorm.CBN(4))
    m(torch.randn(2, 3, 5, 5)).sum().backward()
model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
e = torch._dynamo.explain(lambda x: model(x).sum())(torch.randn(2, 3, 5, 5))
print(e.graph_count, e.graph_break_count, len(e.ops_per_graph[0]))
'''
    outputs = [subprocess.run([sys.executable, '-c', code, arg], capture_output=True, text=True,
                              check=True).stdout.split() for arg in ('without', 'with')]
    assert outputs[0] == outputs[1] == [outputs[0][0], '0', outputs[0][2]]
