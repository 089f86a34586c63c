"""mmnorm.convert and mmnorm.fuse on real CNNs: the model zoo (README.md,
"Deployment and conversion").

torchvision's ResNet-18, MobileNetV3-Small (depthwise convs, Hardswish,
squeeze-excitation), a small DenseNet (concatenations in front of norms) and
RegNetX-400MF (grouped convs), and timm's EfficientNet-B0 (BatchNormAct2d:
BatchNorm, drop and SiLU in one module) and ResNet-10t, all built without
pretrained weights (none can be downloaded), plus small hand-made modules whose
norm is not fed by the conv that a registration-order reading would pair it
with. Every model is float64 and its BatchNorms get random statistics and
affine values first, so that "the eval output is unchanged" is a real test
(:func:`test_random_statistics_matter` shows it is).

These need torchvision and timm, which the torch 2.1 stack has
(requirements/torch2.1.txt); elsewhere the whole file is skipped.
"""
import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn


def _zoo_refusal():
    """Why the zoo cannot be built with this torch, or None."""
    try:
        import torchvision
        torchvision.ops.nms(torch.zeros(1, 4), torch.ones(1), 0.5)  # its compiled ops load
    except Exception as exc:  # noqa: BLE001  (ImportError, or RuntimeError from its ops)
        first_line = (str(exc).strip().splitlines() or [''])[0]
        return (f'the zoo needs a working torchvision, and with torch {torch.__version__} here '
                f'`import torchvision; torchvision.ops.nms(...)` fails: {type(exc).__name__}: '
                f'{first_line} (run it on the torch 2.1 stack, .venv-torch2.1)')
    try:
        import timm  # noqa: F401
    except ImportError as exc:
        return (f'the zoo needs timm (pinned in requirements/torch2.1.txt), not installed with '
                f'torch {torch.__version__} here: {exc}')
    return None


_REFUSAL = _zoo_refusal()
if _REFUSAL is not None:
    pytest.skip(_REFUSAL, allow_module_level=True)

import timm  # noqa: E402
import torchvision  # noqa: E402
from timm.layers import BatchNormAct2d  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

import mmnorm  # noqa: E402
from mmnorm.layers.base import SmallBatchNorm  # noqa: E402
from mmnorm.surgery.convert import convert  # noqa: E402
from mmnorm.surgery.fuse import fuse, mmnorm_modules  # noqa: E402
from mmnorm.surgery.norms import known_norm  # noqa: E402
from mmnorm.surgery.report import SurgeryError, SurgeryReport  # noqa: E402

F64 = torch.float64
# Relative to the largest |output| of the reference. Everything here runs in
# float64, where the folds and rescalings of up to ~50 layers leave errors of
# about 1e-15 (measured: at most 1.2e-14); a lost statistic, a lost activation or
# a conv folded with the wrong norm moves the output by more than 1e-2
# (test_random_statistics_matter), so a bound of 1e-5 separates the two by
# orders of magnitude on either side.
REL_TOL = 1e-5

def _densenet_concatenated_norms(model):
    """The norms of torchvision's DenseNet that no conv feeds: it normalises
    torch.cat of the block's features in front of every dense layer
    (denselayerN.norm1), in every transition and at the end (norm5)."""
    return {name for name, module in model.named_modules()
            if isinstance(module, nn.BatchNorm2d)
            and (('denselayer' in name and name.endswith('.norm1'))
                 or ('transition' in name and name.endswith('.norm')) or name == 'features.norm5')}


def _none(model):
    return set()


# name: (builder, model -> the names of its norms that no conv feeds).
# Input 2 x 3 x 64 x 64: the smallest at which every stride-32 model here still
# has 2 x 2 positions in its last stage (batch statistics of more than one value
# per image and channel when training at batch 2).
ZOO = {
    'tv_resnet18': (lambda: torchvision.models.resnet18(weights=None), _none),
    'tv_mobilenet_v3_small': (lambda: torchvision.models.mobilenet_v3_small(weights=None), _none),
    'tv_densenet_small': (lambda: torchvision.models.DenseNet(
        growth_rate=8, block_config=(2, 2), num_init_features=16), _densenet_concatenated_norms),
    'tv_regnet_x_400mf': (lambda: torchvision.models.regnet_x_400mf(weights=None), _none),
    'timm_efficientnet_b0': (lambda: timm.create_model('efficientnet_b0', pretrained=False),
                             _none),
    'timm_resnet10t': (lambda: timm.create_model('resnet10t', pretrained=False), _none),
}
INPUT_SHAPE = (2, 3, 64, 64)

# The conversions that keep the eval function: BRN and CBN (before burn-in)
# normalise with the running statistics in eval, as BN does; MABN without
# CenConv gets the second moment and a rescaled weight and bias (bn_to_mabn).
KEEPING = {
    'BRN': dict(norm=dict(type='BRN'), conv=None),
    'CBN': dict(norm=dict(type='CBN'), conv=None),
    'MABN': dict(norm=dict(type='MABN'), conv=None),
}
# Every conversion trains; the default is MABN + CenConv, MABN's recipe.
TRAINING = dict(KEEPING, **{'MABN+CenConv (default)': dict()})
NEW_NORM = {'BRN': mmnorm.BRN, 'CBN': mmnorm.CBN, 'MABN': mmnorm.MABN,
            'MABN+CenConv (default)': mmnorm.MABN}
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid)


# ------------------------------------------------------------------ helpers
def randomize_batch_norms(model, seed=0):
    """Every BatchNorm-family layer of ``model`` (frozen ones too: anything
    with a running_var) gets weight in [0.5, 1.5], bias and running_mean in
    [-0.2, 0.2] and running_var in [0.5, 2] (and a step count, as after
    training)."""
    gen = torch.Generator().manual_seed(seed)
    ranges = (('weight', 0.5, 1.5), ('bias', -0.2, 0.2), ('running_mean', -0.2, 0.2),
              ('running_var', 0.5, 2.0))
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, 'running_var', None) is None:
                continue
            for name, low, high in ranges:
                tensor = getattr(module, name)
                values = torch.rand(tensor.shape, generator=gen, dtype=F64) * (high - low) + low
                tensor.copy_(values)
            if getattr(module, 'num_batches_tracked', None) is not None:
                module.num_batches_tracked.fill_(1000)
    return model


def batch_norms(model):
    """{name: module} of the BatchNorm-family layers that torch or timm define."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, _BatchNorm) and not isinstance(module, SmallBatchNorm)}


def eval_output(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def assert_same_output(actual, expected, what):
    scale = expected.abs().max()
    error = (actual - expected).abs().max()
    assert torch.isfinite(actual).all(), f'{what}: non-finite output'
    assert error <= REL_TOL * scale, (f'{what}: max |difference| {error:.3g} > {REL_TOL} * '
                                      f'max |output| {scale:.3g}')


def activation_calls(model, x):
    """Counter of the activation modules' classes, one per call in model(x)."""
    calls = Counter()
    handles = [m.register_forward_hook(lambda m, i, o: calls.update([type(m).__name__]))
               for m in model.modules() if isinstance(m, ACTIVATIONS)]
    try:
        eval_output(model, x)
    finally:
        for handle in handles:
            handle.remove()
    return calls


@pytest.fixture(scope='module')
def zoo_input():
    return torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(123), dtype=F64)


@pytest.fixture(scope='module', params=sorted(ZOO))
def zoo(request, zoo_input):
    """(name, a float64 model with random BatchNorm statistics in eval mode,
    its eval output on zoo_input, the names of its norms that no conv feeds)."""
    name = request.param
    build, unfed = ZOO[name]
    torch.manual_seed(0)
    model = randomize_batch_norms(build().to(F64)).eval()
    return name, model, eval_output(model, zoo_input), unfed(model)


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    """One intra-op thread (as conftest's one_thread, for the module): these
    small inputs run fastest so on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fresh(zoo):
    """A copy of the zoo model to change, with its name and reference output."""
    name, model, expected, unfed = zoo
    return name, copy.deepcopy(model), expected, unfed


# --------------------------------------------------------------- the models
def test_zoo_models_have_what_they_are_chosen_for(zoo):
    name, model, expected, unfed = fresh(zoo)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert batch_norms(model) and expected.shape == (2, 1000)
    assert all(known_norm(m) is not None and known_norm(m).kind == 'batch_norm'
               for m in batch_norms(model).values())
    if name == 'tv_mobilenet_v3_small':
        assert any(c.groups == c.in_channels > 1 for c in convs)  # depthwise
        assert any(isinstance(m, nn.Hardswish) for m in model.modules())
    if name == 'tv_regnet_x_400mf':
        assert any(1 < c.groups < c.in_channels for c in convs)  # grouped
    if name == 'tv_densenet_small':
        assert len(unfed) == 6
    if name == 'timm_efficientnet_b0':
        norm_acts = [m for m in model.modules() if isinstance(m, BatchNormAct2d)]
        assert len(norm_acts) == len(batch_norms(model)) == 49
        assert sum(isinstance(m.act, nn.SiLU) for m in norm_acts) == 33


def test_random_statistics_matter(zoo, zoo_input):
    """The control: with BatchNorm's default statistics and affine values
    instead of the random ones, the output moves by far more than REL_TOL."""
    _, model, expected, _ = fresh(zoo)
    for module in batch_norms(model).values():
        module.reset_parameters()
    changed = eval_output(model, zoo_input)
    assert (changed - expected).abs().max() > 1e-2 * expected.abs().max()


# ------------------------------------------------ conversions keeping eval
@pytest.mark.parametrize('conversion', sorted(KEEPING))
def test_conversion_keeps_the_eval_output(zoo, zoo_input, conversion):
    name, model, expected, unfed = fresh(zoo)
    norms = batch_norms(model)
    report = SurgeryReport()
    converted = convert(model, report=report, **KEEPING[conversion])
    assert converted is model
    assert sorted(e.path for e in report) == sorted(norms)
    # Every BatchNorm replaced (no conv is asked for, so none is refused), except,
    # for CBN (rho = 1 compensates with the weight of the conv that feeds it), the
    # norms that no conv feeds: those stay BatchNorm, skipped and refused.
    kept = set(unfed) if conversion == 'CBN' else set()
    assert set(batch_norms(converted)) == kept
    for e in report:
        assert (e.action, e.refused) == (('skipped', True) if e.path in kept
                                         else ('replaced', False)), e
        if e.path in kept:
            assert e.detail.startswith('CBN compensates its statistics with the weight of the '
                                       'conv that feeds it, and its input comes from '), e
    new = [m for m in converted.modules() if isinstance(m, NEW_NORM[conversion])]
    assert len(new) == len(norms) - len(kept)
    assert all(m.num_batches_tracked == 0 for m in new)  # fresh step counters
    if name.startswith('timm_efficientnet'):
        # BatchNormAct2d -> Sequential(norm, drop, act), activation kept.
        assert all(e.detail.endswith('followed by its own drop and act') for e in report)
    assert_same_output(eval_output(converted, zoo_input), expected, f'{name} -> {conversion}')


def test_fuse_keeps_the_eval_output_and_the_activations(zoo, zoo_input):
    name, model, expected, unfed = fresh(zoo)
    norms = batch_norms(model)
    activations = activation_calls(model, zoo_input)
    report = SurgeryReport()
    fused = fuse(model, report)
    assert sorted(e.path for e in report) == sorted(norms)
    folded = {e.path for e in report if e.action == 'folded'}
    assert folded == set(norms) - unfed
    assert not any(e.refused for e in report if e.path in folded)
    for entry in report:
        if entry.path in unfed:  # DenseNet: BatchNorm after torch.cat stays, refused
            assert (entry.action, entry.refused) == ('kept', True), entry
            assert 'concatenation' in entry.detail, entry
    assert set(batch_norms(fused)) == unfed
    # Folding BatchNormAct2d keeps its act (and drop) after the conv: as many
    # activation calls as before (and the output would differ otherwise).
    assert activation_calls(fused, zoo_input) == activations
    assert_same_output(eval_output(fused, zoo_input), expected, f'fuse({name})')


@pytest.mark.parametrize('conversion', sorted(KEEPING))
def test_fuse_after_conversion_keeps_the_eval_output(zoo, zoo_input, conversion):
    name, model, expected, unfed = fresh(zoo)
    converted = convert(model, **KEEPING[conversion])
    report = SurgeryReport()
    fused = fuse(converted, report)
    # Every mmnorm norm folded, or (no conv feeding it) an eval-mode BatchNorm2d;
    # for CBN those norms stayed BatchNorm (convert skipped them), which fuse keeps.
    kept = set(unfed) if conversion == 'CBN' else set()
    assert {e.path for e in report if e.refused} == kept, report.lines()
    assert {e.path for e in report if e.action == 'replaced'} == set(unfed) - kept
    assert not mmnorm_modules(fused)
    assert_same_output(eval_output(fused, zoo_input), expected,
                       f'fuse(convert({name}, {conversion}))')


def test_default_conversion_and_its_fuse(zoo, zoo_input):
    """convert(m) (MABN + CenConv) changes the function (CenConv removes the
    filter means), so its own eval output is the reference of its fuse."""
    name, model, _, unfed = fresh(zoo)
    norms = batch_norms(model)
    report = SurgeryReport()
    converted = convert(model, report=report)
    norm_entries = {e.path: e for e in report if e.path in norms}
    assert set(norm_entries) == set(norms)
    cenconvs = {path for path, m in converted.named_modules() if isinstance(m, mmnorm.CenConv)}
    # One CenConv for each norm that a conv feeds; the others get a refused 'skipped'.
    assert len(cenconvs) == len(norms) - len(unfed)
    assert {e.path for e in report if e.what == 'Conv2d' and e.action == 'replaced'} == cenconvs
    for path, entry in norm_entries.items():
        if path in unfed:
            assert (entry.action, entry.refused) == ('skipped', True), entry
            assert entry.detail.startswith('no CenConv in front of it'), entry
            assert 'concatenation' in entry.detail, entry
        else:
            assert (entry.action, entry.refused) == ('replaced', False), entry
    assert [e for e in report if e.refused and e.path not in unfed] == []
    assert not batch_norms(converted)  # also the skipped ones are MABN now
    converted_output = eval_output(converted, zoo_input)
    assert torch.isfinite(converted_output).all()
    fuse_report = SurgeryReport()
    fused = fuse(converted, fuse_report)
    assert not any(e.refused for e in fuse_report), fuse_report.lines()
    assert not mmnorm_modules(fused)
    assert_same_output(eval_output(fused, zoo_input), converted_output,
                       f'fuse(convert({name}))')


def test_strict_default_conversion_refuses_norms_without_conv(zoo, zoo_input):
    name, model, expected, unfed = fresh(zoo)
    if not unfed:  # nothing to refuse: no error
        fused = fuse(copy.deepcopy(model), strict=True)
        assert not batch_norms(fused)
        convert(model, strict=True)
        assert not batch_norms(model)
        return
    state = {key: value.clone() for key, value in model.state_dict().items()}
    classes = [(path, type(m)) for path, m in model.named_modules()]
    with pytest.raises(SurgeryError, match=f'convert\\(strict=True\\): {len(unfed)} norm') as error:
        convert(model, strict=True)
    assert all(path in str(error.value) for path in unfed)
    # Raised before anything changed.
    assert [(path, type(m)) for path, m in model.named_modules()] == classes
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert_same_output(eval_output(model, zoo_input), expected, f'{name} after the refusal')
    with pytest.raises(SurgeryError, match=f'fuse\\(strict=True\\): {len(unfed)} norm'):
        fuse(model, strict=True)
    assert [(path, type(m)) for path, m in model.named_modules()] == classes


# -------------------------------------------------------------- training
@pytest.mark.parametrize('conversion', sorted(TRAINING))
def test_converted_model_trains_two_sgd_steps_at_batch_two(zoo, conversion, request):
    name, model, _, _ = fresh(zoo)
    model = convert(model, **TRAINING[conversion]).train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.SGD(params.values(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(7)
    for step in range(2):
        x = torch.randn(*INPUT_SHAPE, generator=gen, dtype=F64)
        target = torch.randint(0, 1000, (2,), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        assert torch.isfinite(out).all(), f'{name} {conversion} step {step}: output'
        loss = F.cross_entropy(out, target)
        assert torch.isfinite(loss), f'{name} {conversion} step {step}: loss'
        loss.backward()
        missing = [n for n, p in params.items() if p.grad is None]
        bad = [n for n, p in params.items() if p.grad is not None and not p.grad.isfinite().all()]
        assert not missing and not bad, (f'{name} {conversion} step {step}: no gradient for '
                                         f'{missing[:5]}, non-finite for {bad[:5]}')
        optimizer.step()
    assert all(p.isfinite().all() for p in params.values())
    norms = [m for m in model.modules() if isinstance(m, NEW_NORM[conversion])]
    assert norms and all(m.num_batches_tracked == 2 for m in norms)
    # Every parameter moved, except (BRN, whose warm-up normalises with the batch
    # mean) the bias of a norm whose output reaches the next centring norm only
    # through a 1x1 conv: a per-channel constant there is removed by that norm's
    # batch mean, so its gradient is 0 up to rounding (~1e-16 in float64).
    norm_biases = {f'{n}.bias' for n, m in model.named_modules()
                   if isinstance(m, NEW_NORM[conversion])}
    unchanged = [n for n, p in params.items() if torch.equal(p, before[n])]
    assert [n for n in unchanged if n not in norm_biases or conversion != 'BRN'] == []
    # The trained statistics fold too: fuse keeps the trained model's eval output.
    trained_output = eval_output(model, x)
    assert torch.isfinite(trained_output).all()
    assert_same_output(eval_output(fuse(model), x), trained_output,
                       f'fuse({name} {conversion} after 2 steps)')


# ------------------------------------------- hand-made: what feeds a norm
class NormRegisteredAfterItsConsumer(nn.Module):
    """Registers ``conv`` before ``bn`` (as conv-then-norm code does) but
    normalises its input first: ``conv(bn(x))``. The conv has as many output
    channels as the norm, so only the call order tells the two apart."""

    def __init__(self, channels=4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.conv(self.bn(x))


def norm_then_conv(channels=4):
    """A norm in front of a conv (as the input normalisation of a network),
    then a conv -> norm pair that can be folded."""
    return nn.Sequential(nn.BatchNorm2d(channels), nn.Conv2d(channels, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU())


HAND_MADE = {
    # name: (builder, {norm: the start of fuse's reason}, {norm: conv it folds into})
    'registered-conv-first': (NormRegisteredAfterItsConsumer,
                              {'bn': 'not folded: its input comes from the input of <root>'}, {}),
    'norm-then-conv': (norm_then_conv,
                       {'0': 'not folded: its input comes from the input of <root>'}, {'2': '1'}),
}


@pytest.mark.parametrize('case', sorted(HAND_MADE))
def test_norm_in_front_of_a_conv_is_not_folded(case):
    build, kept, folded = HAND_MADE[case]
    torch.manual_seed(0)
    model = randomize_batch_norms(build().to(F64)).eval()
    x = torch.randn(2, 4, 9, 9, dtype=F64)
    expected = eval_output(model, x)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d)}
    report = SurgeryReport()
    fused = fuse(copy.deepcopy(model), report)
    entries = {e.path: e for e in report}
    assert set(entries) == set(kept) | set(folded)
    for path, reason in kept.items():
        assert (entries[path].action, entries[path].detail, entries[path].refused) == (
            'kept', reason, True)
        assert type(fused.get_submodule(path)) is nn.BatchNorm2d
    for path, conv in folded.items():
        assert (entries[path].action, entries[path].detail) == ('folded', f'into {conv}')
    for path, weight in weights.items():  # the conv behind the kept norm is untouched
        if path not in folded.values():
            assert torch.equal(fused.get_submodule(path).weight, weight)
    assert_same_output(eval_output(fused, x), expected, f'fuse({case})')

    # convert: the norm is replaced, but no CenConv is put behind it (the conv
    # it feeds is not the conv that feeds it); strict refuses before changing.
    report = SurgeryReport()
    converted = convert(copy.deepcopy(model), report=report)
    entries = {e.path: e for e in report}
    for path in kept:
        assert (entries[path].action, entries[path].refused) == ('skipped', True)
        assert entries[path].detail.startswith('no CenConv in front of it: its input comes '
                                               'from the input of <root>')
        assert isinstance(converted.get_submodule(path), mmnorm.MABN)
    cenconvs = {n for n, m in converted.named_modules() if isinstance(m, mmnorm.CenConv)}
    assert cenconvs == set(folded.values())
    untouched = copy.deepcopy(model)
    with pytest.raises(SurgeryError, match='convert\\(strict=True\\)'):
        convert(untouched, strict=True)
    assert [type(m) for m in untouched.modules()] == [type(m) for m in model.modules()]
    # Without a conv asked for, the conversion keeps the eval output.
    converted = convert(copy.deepcopy(model), norm=dict(type='MABN'), conv=None, strict=True)
    assert_same_output(eval_output(converted, x), expected, f'convert({case}, MABN)')
    assert_same_output(eval_output(fuse(converted), x), expected, f'fuse(convert({case}, MABN))')


def test_conv_output_read_twice_is_not_folded():
    """conv -> bn, and the conv's output also added after the norm: folding
    would change the other reader, so the norm stays."""

    class ReadTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    torch.manual_seed(0)
    model = randomize_batch_norms(ReadTwice().to(F64)).eval()
    x = torch.randn(2, 4, 9, 9, dtype=F64)
    expected = eval_output(model, x)
    report = SurgeryReport()
    fused = fuse(copy.deepcopy(model), report)
    assert [(e.path, e.action, e.refused) for e in report] == [('bn', 'kept', True)]
    assert 'the output of conv is also used by' in report[0].detail
    assert torch.equal(fused.conv.weight, model.conv.weight)
    assert_same_output(eval_output(fused, x), expected, 'fuse(ReadTwice)')


# ------------------------------------------------------- frozen BatchNorms
def frozen_torchvision_resnet18():
    """torchvision's ResNet-18 with its FrozenBatchNorm2d, as torchvision's
    detection models build their backbones."""
    return torchvision.models.resnet18(weights=None,
                                       norm_layer=torchvision.ops.misc.FrozenBatchNorm2d)


def frozen_norms(model):
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torchvision.ops.misc.FrozenBatchNorm2d)}


def test_torchvision_frozen_batch_norms_are_kept_by_convert_and_fuse_keeps_the_output(
        zoo_input):
    torch.manual_seed(0)
    model = randomize_batch_norms(frozen_torchvision_resnet18().to(F64)).eval()
    expected = eval_output(model, zoo_input)
    report = SurgeryReport()
    convert(model, report=report, strict=True)  # frozen: kept, not refused
    assert [(e.action, e.refused) for e in report] == [('kept', False)] * 20
    assert not any(isinstance(m, mmnorm.CenConv) for m in model.modules())
    assert_same_output(eval_output(fuse(model), zoo_input), expected, 'fuse(frozen resnet18)')


def test_torchvision_frozen_batch_norms_are_folded(zoo_input):
    torch.manual_seed(0)
    model = randomize_batch_norms(frozen_torchvision_resnet18().to(F64)).eval()
    expected = eval_output(model, zoo_input)
    report = SurgeryReport()
    fused = fuse(model, report)
    assert_same_output(eval_output(fused, zoo_input), expected, 'fuse(frozen resnet18)')
    assert [(e.action, e.refused) for e in report] == [('folded', False)] * 20, report.lines()[:2]
    assert not frozen_norms(fused)


def test_timm_frozen_batch_norms_fold():
    """timm's freeze_batch_norm_2d turns BatchNorm2d into torchvision's
    FrozenBatchNorm2d (with num_features set): fuse folds them all."""
    from timm.layers import freeze_batch_norm_2d
    torch.manual_seed(0)
    model = randomize_batch_norms(freeze_batch_norm_2d(
        timm.create_model('resnet10t', pretrained=False)).to(F64)).eval()
    x = torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(1), dtype=F64)
    expected = eval_output(model, x)
    assert len(frozen_norms(model)) == 14
    report = SurgeryReport()
    fused = fuse(model, report, strict=True)
    assert [(e.action, e.refused) for e in report] == [('folded', False)] * 14
    assert not frozen_norms(fused)
    assert_same_output(eval_output(fused, x), expected, 'fuse(frozen timm resnet10t)')


def test_timm_frozen_norm_act_layers_are_reported_by_fuse():
    from timm.layers import FrozenBatchNormAct2d, freeze_batch_norm_2d
    torch.manual_seed(0)
    model = randomize_batch_norms(freeze_batch_norm_2d(
        timm.create_model('efficientnet_b0', pretrained=False)).to(F64)).eval()
    x = torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(1), dtype=F64)
    expected = eval_output(model, x)
    frozen = [n for n, m in model.named_modules() if isinstance(m, FrozenBatchNormAct2d)]
    assert len(frozen) == 49
    report = SurgeryReport()
    fused = fuse(model, report)
    assert_same_output(eval_output(fused, x), expected, 'fuse(frozen timm efficientnet_b0)')
    assert sorted(e.path for e in report) == sorted(frozen)
