"""convert and fuse never change a model's function without a word: pairs
from the dataflow, only known forwards replaced or folded, every norm in the
report, strict=True, errors that name the module, and PyTorch's own
convert_sync_batchnorm after convert. (Real torchvision and timm models:
tests/surgery/test_zoo.py, on the torch 2.1 stack.)"""
import warnings

import pytest
import torch
from torch import nn

import mmnorm
from mmnorm.surgery.convert import convert
from mmnorm.surgery.fuse import fuse
from mmnorm.surgery.report import SurgeryError, SurgeryReport

F64 = torch.float64
C = 4


def randomized(model, seed=0):
    """Every BatchNorm with statistics and affine values away from 0 and 1, in float64."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name, low, high in (('weight', 0.5, 1.5), ('bias', -0.3, 0.3),
                                    ('running_mean', -0.5, 0.5), ('running_var', 0.5, 2.0)):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor) and isinstance(m, nn.modules.batchnorm._BatchNorm):
                    t.copy_(torch.rand(t.shape, generator=gen) * (high - low) + low)
    return model.to(F64).eval()


def output(model, x):
    with torch.no_grad():
        return model.eval()(x)


def entries(report):
    return {e.path: (e.action, e.detail, e.refused) for e in report}


class NormFirst(nn.Module):
    """Registers conv before bn, applies bn first: registration order is not dataflow."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        return self.conv(self.bn(x))


class ConvOutputUsedTwice(nn.Module):
    """conv -> bn, but the conv's output is also added to the result."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class Concatenated(nn.Module):
    """Two convs concatenated, then a BatchNorm (DenseNet's pattern)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(C, C, 1), nn.Conv2d(C, C, 1)
        self.bn = nn.BatchNorm2d(2 * C)

    def forward(self, x):
        return self.bn(torch.cat([self.a(x), self.b(x)], 1))


class Untraceable(nn.Module):
    """Branches on a tensor value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        if x.sum() > 0:
            return self.bn(self.conv(x))
        return self.bn(self.conv(-x))


class ScaledBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass with a forward of its own."""

    def forward(self, x):
        return 2 * super().forward(x)


# ---------------------------------------------------------------- dataflow
@pytest.mark.parametrize('make, reason', [
    (NormFirst, 'its input comes from the input of <root>'),
    (ConvOutputUsedTwice, 'the output of conv is also used by'),
    (Untraceable, '<root> (Untraceable) does not trace with torch.fx'),
])
def test_fuse_folds_only_what_the_forward_pairs(make, reason):
    torch.manual_seed(0)
    model = randomized(make())
    x = torch.randn(2, C, 6, 6, dtype=F64)
    expected = output(model, x)
    report = SurgeryReport()
    fused = fuse(model, report)
    assert isinstance(fused.bn, nn.BatchNorm2d)  # not folded
    action, detail, refused = entries(report)['bn']
    assert action == 'kept' and reason in detail and refused, detail
    torch.testing.assert_close(output(fused, x), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(SurgeryError, match=r'fuse\(strict=True\): 1 norm layer\(s\) stayed'):
        fuse(randomized(make()), strict=True)


def test_a_concatenation_in_front_is_reported_and_strict_refuses_before_changing():
    model = randomized(Concatenated())
    report = SurgeryReport()
    convert(model, report=report)  # MABN + CenConv
    action, detail, refused = entries(report)['bn']
    assert action == 'skipped' and refused
    assert 'no CenConv in front of it: its input comes from torch.cat (a concatenation)' in detail
    assert isinstance(model.bn, mmnorm.MABN) and type(model.a) is nn.Conv2d
    model = randomized(Concatenated())
    with pytest.raises(SurgeryError, match='convert.strict=True.*bn'):
        convert(model, strict=True)
    assert type(model.bn) is nn.BatchNorm2d  # unchanged


# ------------------------------------------------------- which norms
def test_unknown_subclass_and_no_running_stats_stay_and_are_reported():
    model = randomized(nn.Sequential(nn.Conv2d(3, C, 3), ScaledBN(C), nn.Conv2d(C, C, 3),
                                     nn.BatchNorm2d(C, track_running_stats=False)))
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    expected = output(model, x)
    report = SurgeryReport()
    convert(model, norm=dict(type='BRN'), conv=None, report=report)
    assert type(model[1]) is ScaledBN and type(model[3]) is nn.BatchNorm2d
    found = entries(report)
    assert found['1'][0] == 'kept' and 'has its own forward' in found['1'][1]
    assert found['3'][0] == 'skipped' and 'track_running_stats=False' in found['3'][1]
    torch.testing.assert_close(output(model, x), expected)
    report = SurgeryReport()
    fused = fuse(model, report)
    torch.testing.assert_close(output(fused, x), expected, rtol=1e-12, atol=1e-12)
    assert [e.action for e in report] == ['kept', 'kept'] and all(e.refused for e in report)


def test_sync_batch_norm_is_converted_like_batch_norm_and_says_so():
    model = randomized(nn.Sequential(nn.Conv2d(3, C, 3), nn.SyncBatchNorm(C)))
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    expected = output(model, x)  # in eval, SyncBatchNorm is BatchNorm (no process group needed)
    report = SurgeryReport()
    convert(model, norm=dict(type='BRN'), conv=None, report=report)
    assert isinstance(model[1], mmnorm.BRN) and not model[1].sync_stats
    assert 'was SyncBatchNorm' in entries(report)['1'][1]
    torch.testing.assert_close(output(model, x), expected)


@pytest.mark.parametrize('kind', [nn.BatchNorm1d, nn.BatchNorm3d])
def test_batch_norm_1d_and_3d_convert_where_the_layer_takes_them(kind):
    shape = (4, C, 5) if kind is nn.BatchNorm1d else (2, C, 3, 3, 3)
    model = randomized(nn.Sequential(kind(C)))
    x = torch.randn(shape, dtype=F64)
    expected = output(model, x)
    report = SurgeryReport()
    convert(model, norm=dict(type='MABN'), conv=None, report=report)
    assert isinstance(model[0], mmnorm.MABN) and entries(report)['0'][0] == 'replaced'
    torch.testing.assert_close(output(model, x), expected)
    report = SurgeryReport()
    other = randomized(nn.Sequential(kind(C)))
    convert(other, norm=dict(type='CBN'), conv=None, report=report)
    assert type(other[0]) is kind
    assert entries(report)['0'][:2] == ('skipped', f'CBN takes the 4-D output of a 2-D conv, '
                                                   f'not the inputs of {kind.__name__}')
    convert(other, norm=dict(type='CBN', rho=0.0), conv=None)  # no conv read: any rank
    assert isinstance(other[0], mmnorm.CBN)
    torch.testing.assert_close(output(other, x), output(randomized(nn.Sequential(kind(C))), x))


# ------------------------------------------------------------- messages
def test_option_errors_name_the_module_path_and_the_option():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 24, 3), nn.BatchNorm2d(24)))
    with pytest.raises(TypeError, match=r"^0\.1: MABN has no option 'bufer_size' \(did you mean "
                                        r"'buffer_size'\?\); MABN takes: "):
        convert(model, norm=dict(type='MABN', bufer_size=4))
    pytest.importorskip('mmcv.cnn')
    with pytest.raises(ValueError, match=r'^0\.1: GN for 24 channels: .*divisible'):
        convert(model, norm=dict(type='GN', num_groups=5))
    assert type(model[0][1]) is nn.BatchNorm2d  # nothing changed


def test_jit_script_says_to_fuse_first_and_the_fused_model_scripts():
    model = convert(randomized(nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), nn.ReLU())))
    with pytest.raises(RuntimeError, match=r'CenConv: torch.jit.script cannot compile .*'
                                           r'mmnorm.fuse\(model\)'):
        torch.jit.script(model)
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    fused = fuse(model)
    torch.testing.assert_close(torch.jit.script(fused)(x), output(fused, x))


# ------------------------------------------------- convert_sync_batchnorm
def test_torch_convert_sync_batchnorm_after_convert_keeps_the_layers_and_warns():
    model = convert(nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), nn.ReLU(),
                                  nn.Conv2d(C, C, 3), nn.BatchNorm2d(C)),
                    norm=dict(type='BRN'), conv=None)
    model.append(nn.BatchNorm2d(C))
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter('always')
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert [type(m).__name__ for m in synced] == ['Conv2d', 'BRN', 'ReLU', 'Conv2d', 'BRN',
                                                  'SyncBatchNorm']
    messages = [str(w.message) for w in records if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "kept the mmnorm layers {'BRN': 2}" in messages[0]
    assert 'sync_stats=True' in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # nothing to say for a model without mmnorm layers
        assert type(nn.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm2d(C))) is \
            nn.SyncBatchNorm


def test_cbn_needs_the_conv_that_feeds_it():
    # CBN (rho = 1) compensates with the weight of the conv feeding it: behind a
    # concatenation it could not train, so convert leaves that BatchNorm and says so.
    model = randomized(Concatenated())
    report = SurgeryReport()
    convert(model, norm=dict(type='CBN'), conv=None, report=report)
    action, detail, refused = entries(report)['bn']
    assert (action, refused) == ('skipped', True) and type(model.bn) is nn.BatchNorm2d
    assert 'its input comes from torch.cat (a concatenation); rho=0 in norm' in detail
    convert(model, norm=dict(type='CBN', rho=0.0), conv=None)  # the naive average needs no conv
    assert isinstance(model.bn, mmnorm.CBN)
    model.train()(torch.randn(2, C, 5, 5, dtype=F64)).sum().backward()


class CachesInForward(nn.Module):
    """Caches a value computed from its input at the first call (as
    torchvision's MultiScaleRoIAlign caches its scales)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)
        self.scale = None

    def forward(self, x):
        if self.scale is None:
            self.scale = x.shape[-1]
        return self.bn(self.conv(x)) * self.scale


def test_tracing_leaves_no_traced_value_behind():
    model = randomized(CachesInForward())
    x = torch.randn(2, C, 6, 6, dtype=F64)
    convert(model, norm=dict(type='BRN'), conv=None)
    assert model.scale is None  # the trace's Proxy did not stay
    fused = fuse(model)
    assert fused.scale is None and isinstance(fused.bn, nn.Identity)
    assert fused(x).shape == x.shape and fused.scale == 6
