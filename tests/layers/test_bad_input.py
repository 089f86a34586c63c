"""Bad input, the same cases for every layer: MABN, CBN (behind the
conv that feeds it), BRN, and WSConv / CenConv where a case means something
for a conv. Each case gets a correct result, checked against a value computed
here, or an error whose message names the layer and says what was wrong.

More detailed per-layer versions of some cases (many steps against a
re-derivation of the papers' equations) are in test_mabn.py, test_cbn.py and
test_brn.py.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmnorm.layers import BRN, CBN, MABN, CenConv, WSConv, conv_types, norm_types

from conftest import NO_CPU_FLOAT16_AUTOCAST, NO_CPU_FLOAT16_CONV

F64 = torch.float64
C = 4
NORMS = ('MABN', 'CBN', 'BRN')
CONVS = ('WSConv', 'CenConv')


def test_every_registered_layer_meets_these_cases():
    # a new layer gets its subject in build() and joins the lists
    assert set(norm_types()) == set(NORMS) and set(conv_types()) == set(CONVS)


def build(kind, dtype=F64):
    """The subject: a norm layer (CBN behind a depthwise 1x1 conv, so each of
    its channels depends on one input channel) or a 3x3 conv, C -> C channels."""
    torch.manual_seed(0)
    if kind == 'MABN':
        model = MABN(C, buffer_size=2, warmup_iters=0, renorm_start_iter=2)
    elif kind == 'BRN':
        model = BRN(C, momentum=0.1)
    elif kind == 'CBN':
        model = nn.Sequential(nn.Conv2d(C, C, 1, groups=C), CBN(C, buffer_num=2))
    else:
        model = dict(WSConv=WSConv, CenConv=CenConv)[kind](C, C, 3, padding=1)
    model = model.to(dtype)
    norm = norm_layer(model)
    if norm is not None:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    return model


def norm_layer(model):
    return next((m for m in model.modules() if isinstance(m, (MABN, CBN, BRN))), None)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def train_step(model, x, seed=0):
    """Forward and backward with a random output gradient; returns (y, dx,
    parameter gradients by name)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = model(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    y.backward(dy)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return y.detach(), x.grad, grads


def warm_up(model, steps=3):
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        train_step(model, torch.randn(2, C, 3, 3, generator=gen, dtype=F64) + 1, seed=i)


def transformed_reference(kind, weight):
    """W - mean (CenConv) or (W - mean) / (unbiased std + 1e-5) (WSConv), per
    output filter, in float64."""
    w = weight.detach().to(F64)
    centred = w - w.mean((1, 2, 3), keepdim=True)
    if kind == 'CenConv':
        return centred
    return centred / (w.flatten(1).std(1).view(-1, 1, 1, 1) + 1e-5)


def nonfinite_warnings(records):
    return [w for w in records
            if issubclass(w.category, RuntimeWarning) and 'inf or NaN' in str(w.message)]


# ------------------------------------------------------------ empty tensors
@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('shape', [(0, C, 3, 3), (0, C), (2, C, 0, 3)])
@pytest.mark.parametrize('kind', NORMS)
def test_norm_empty_input_returns_empty_and_changes_nothing(kind, shape, training):
    model = build(kind)
    warm_up(model)
    model.train(training)
    # zero-size maps (or 2-D input) cannot go through the conv: CBN gets them directly
    direct = kind == 'CBN' and (len(shape) != 4 or shape[2] == 0)
    target = norm_layer(model) if direct else model
    before = state(model)
    y, dx, grads = train_step(target, torch.randn(shape, dtype=F64))
    assert y.shape == dx.shape == shape
    for name, grad in grads.items():
        assert torch.equal(grad, torch.zeros_like(grad)), name
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize('kind', CONVS)
def test_conv_empty_batch_and_empty_maps(kind):
    conv = build(kind)
    y, dx, grads = train_step(conv, torch.randn(0, C, 5, 5, dtype=F64))
    assert y.shape == (0, C, 5, 5) and dx.shape == (0, C, 5, 5)
    assert torch.equal(grads['weight'], torch.zeros_like(conv.weight))
    # maps smaller than the kernel: nn.Conv2d's error, after the layer's name
    plain = nn.Conv2d(C, C, 3, padding=1).to(F64)
    x = torch.randn(2, C, 0, 3, dtype=F64)
    with pytest.raises(RuntimeError) as expected:
        plain(x)
    with pytest.raises(RuntimeError) as got:
        conv(x)
    assert str(got.value) == f'{kind}: {expected.value}'
    assert "Kernel size can't be greater than actual input size" in str(got.value)


# ----------------------------------------------- one element per channel
@pytest.mark.parametrize('shape', [(1, C, 1, 1), (1, C)])
@pytest.mark.parametrize('kind', NORMS)
def test_norm_single_element_per_channel(kind, shape):
    model = build(kind)
    norm = norm_layer(model)
    if kind == 'CBN' and len(shape) == 2:  # a 2-D input has no conv: the uncompensated CBN
        model = norm = CBN(C, buffer_num=2, rho=0.0).to(F64)
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(shape, generator=gen, dtype=F64) for _ in range(3)]
    inputs = []  # what the norm layer itself sees
    norm.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    weight, bias = norm.weight.detach().clone(), norm.bias.detach().clone()
    eps = norm.eps
    steps = [train_step(model, x) for x in xs]
    a, b, c = (v.reshape(-1) for v in inputs)  # one value per channel and step
    y1, y2, y3 = (y.reshape(-1) for y, _, _ in steps)
    dx1 = steps[0][1]
    assert all(torch.isfinite(dx).all() for _, dx, _ in steps)
    if kind == 'MABN':
        # t = 1: v = a^2, y = weight * a / sqrt(a^2 + eps) + bias, gradient exact
        x1 = xs[0].reshape(-1).clone().requires_grad_()
        expect = weight * x1 / (x1 ** 2 + eps).sqrt() + bias
        torch.testing.assert_close(y1, expect.detach())
        dy = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=F64)
        expect.backward(dy.reshape(-1))
        torch.testing.assert_close(dx1.reshape(-1), x1.grad)
        # t = 2 <= m: still the batch statistic
        torch.testing.assert_close(y2, weight * b / (b ** 2 + eps).sqrt() + bias)
        # t = 3: v = mean of the 2 rows (b^2, c^2); r leaves 1 (t > renorm_start_iter)
        running = 0.98 * (0.98 + 0.02 * a ** 2) + 0.02 * b ** 2
        v = (b ** 2 + c ** 2) / 2
        r = ((v + eps).sqrt() / (running + eps).sqrt()).clamp(1 / 5, 5)
        torch.testing.assert_close(y3, weight * r * c / (v + eps).sqrt() + bias)
        torch.testing.assert_close(norm.running_var, 0.98 * running + 0.02 * v)
    elif kind == 'CBN':
        # step 1: plain BN of one value: variance 0, y = bias, dx = 0
        torch.testing.assert_close(y1, bias)
        assert not dx1.any()
        # steps 2, 3: the window pools them with the k = 2 past steps (the conv
        # weight did not change, so the compensation is 0)
        for y, seen in ((y2, (a, b)), (y3, (a, b, c))):
            mu = sum(seen) / len(seen)
            sigma2 = sum((v - mu) ** 2 for v in seen) / len(seen)
            torch.testing.assert_close(y, weight * (seen[-1] - mu) / (sigma2 + eps).sqrt() + bias)
        torch.testing.assert_close(norm.running_mean, 0.9 * (0.9 * 0.1 * a + 0.1 * b) + 0.1 * c)
        assert torch.equal(norm.running_var, torch.ones(C, dtype=F64))  # no unbiased variance
    else:
        # warm-up: BN with batch statistics, y = bias, dx = 0; the running
        # standard deviation moves toward sqrt(eps)
        for y in (y1, y2, y3):
            torch.testing.assert_close(y, bias)
        assert not dx1.any()
        sigma = math.sqrt(1 + eps)
        for _ in range(3):
            sigma = sigma + 0.1 * (math.sqrt(eps) - sigma)
        torch.testing.assert_close(norm.running_mean, 0.9 * (0.9 * 0.1 * a + 0.1 * b) + 0.1 * c)
        torch.testing.assert_close(norm.running_var, torch.full((C,), sigma ** 2 - eps,
                                                                dtype=F64))


@pytest.mark.parametrize('kind', CONVS)
def test_conv_single_element_per_channel(kind):
    conv = build(kind)
    x = torch.randn(1, C, 1, 1, dtype=F64)
    y, _, grads = train_step(conv, x)
    expect = F.conv2d(x, transformed_reference(kind, conv.weight), conv.bias, padding=1)
    torch.testing.assert_close(y, expect)
    assert torch.isfinite(grads['weight']).all()
    # a filter of one element: centred (and standardised) to 0, the output is the bias
    one = dict(WSConv=WSConv, CenConv=CenConv)[kind](C, C, 1, groups=C).to(F64)
    y, _, grads = train_step(one, torch.randn(2, C, 3, 3, dtype=F64))
    torch.testing.assert_close(y, one.bias.detach().view(1, C, 1, 1).expand_as(y))
    assert torch.isfinite(grads['weight']).all()


# ------------------------------------------------------- inf and NaN input
@pytest.mark.parametrize('kind', NORMS)
def test_inf_and_nan_activations_poison_no_buffer_and_training_goes_on(kind):
    model = build(kind)
    norm = norm_layer(model)
    warm_up(model)
    before = state(norm)
    x = torch.randn(2, C, 3, 3, dtype=F64) + 1
    x[0, 0, 1, 1] = math.inf
    x[1, 1, 0, 2] = math.nan
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter('always')
        train_step(model, x)
        assert not nonfinite_warnings(records)  # the step reads nothing on the host
        norm.report_nonfinite()  # as train(), eval() and saving a state dict do
        found = nonfinite_warnings(records)
        assert len(found) == 1 and kind in str(found[0].message)
        statistic = 'buffer_x2' if kind == 'MABN' else 'running_mean'
        for key, value in norm.state_dict().items():
            if value.dtype.is_floating_point:
                assert torch.isfinite(value).all(), key
        # the finite channels were updated as usual
        assert not torch.equal(getattr(norm, statistic)[..., 2:], before[statistic][..., 2:])
        # The next finite steps train exactly like a fresh layer given the
        # same (finite) state, without another warning.
        fresh = build(kind)
        fresh.load_state_dict(model.state_dict())
        gen = torch.Generator().manual_seed(9)
        for i in range(3):
            x = torch.randn(2, C, 3, 3, generator=gen, dtype=F64) + 1
            y, dx, grads = train_step(model, x, seed=i)
            y_ref, dx_ref, grads_ref = train_step(fresh, x, seed=i)
            assert torch.isfinite(y).all() and torch.isfinite(dx).all()
            assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
            for name in grads:
                assert torch.equal(grads[name], grads_ref[name]), name
        norm.report_nonfinite()
        for key, value in fresh.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key
        assert len(nonfinite_warnings(records)) == 1


# ----------------------------------------------- 1e4 activations in half
def expected_statistics(kind, x, norm):
    """The float64 value of the norm's statistics buffer after its first
    training step on ``x`` (what the layer saw)."""
    x = x.to(F64)
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x, dims, correction=0)
    if kind == 'MABN':
        return dict(running_var=0.98 + 0.02 * (x ** 2).mean(dims))
    if kind == 'CBN':
        n = x.numel() // x.size(1)
        return dict(running_mean=0.1 * mean, running_var=0.9 + 0.1 * var * n / (n - 1))
    sigma = math.sqrt(1 + norm.eps)
    sigma = sigma + 0.1 * ((var + norm.eps).sqrt() - sigma)
    return dict(running_mean=0.1 * mean, running_var=sigma ** 2 - norm.eps)


@pytest.mark.parametrize('mode', ['autocast_bfloat16', 'autocast_float16', 'half_module'])
@pytest.mark.parametrize('kind', NORMS)
def test_norm_1e4_activations_in_half_precision(kind, mode):
    model = build(kind, torch.float32)
    if mode == 'autocast_float16' and NO_CPU_FLOAT16_AUTOCAST:
        pytest.skip(NO_CPU_FLOAT16_AUTOCAST)
    if mode == 'half_module' and NO_CPU_FLOAT16_CONV and any(
            isinstance(m, nn.Conv2d) for m in model.modules()):
        pytest.skip(NO_CPU_FLOAT16_CONV)
    norm = norm_layer(model)
    x = torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(5)) * 1e4
    seen = []
    norm.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    if mode == 'half_module':
        model.half()
        y = model(x.half())
        out_dtype = torch.float16
    else:
        low = dict(autocast_bfloat16=torch.bfloat16, autocast_float16=torch.float16)[mode]
        with torch.autocast('cpu', dtype=low):
            y = model(x)
        # MABN gives autocast's dtype; CBN and BRN, like BatchNorm, their
        # input's (CBN's input is its conv's output, in autocast's dtype)
        out_dtype = torch.float32 if kind == 'BRN' else low
    assert y.dtype == out_dtype and torch.isfinite(y).all()
    y.float().sum().backward()
    for key, value in norm.state_dict().items():
        if value.dtype.is_floating_point and key not in ('weight', 'bias'):
            assert value.dtype == torch.float32, key
            assert torch.isfinite(value).all(), key
    assert (seen[0].float().abs().amax() > 1e4).item()  # second moments near 1e8 > fp16 max
    for key, value in expected_statistics(kind, seen[0], norm).items():
        torch.testing.assert_close(getattr(norm, key).to(F64), value, rtol=1e-5, atol=0,
                                   msg=key)


@pytest.mark.parametrize('kind', CONVS)
def test_conv_1e4_in_half_precision(kind):
    # activations of 1e4 under bfloat16 autocast: the float32 result, rounded
    conv = build(kind, torch.float32)
    x = torch.randn(2, C, 5, 5, generator=torch.Generator().manual_seed(5)) * 1e4
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    with torch.no_grad():
        expect = F.conv2d(x.to(F64), transformed_reference(kind, conv.weight),
                          conv.bias.to(F64), padding=1)
    torch.testing.assert_close(y.detach().to(F64), expect, rtol=3e-2,
                               atol=1e-2 * expect.abs().max().item())
    # a half module with weights of 1e4: the filter statistics (their squares
    # reach 1e8) are computed in float32, the transformed weight is finite
    conv = build(kind, torch.float32)
    with torch.no_grad():
        conv.weight.mul_(3e4)
    conv.half()
    with torch.no_grad():
        weight = conv.transformed_weight()
    assert weight.dtype == torch.float16 and torch.isfinite(weight).all()
    torch.testing.assert_close(weight.to(F64), transformed_reference(kind, conv.weight),
                               rtol=2e-3, atol=1e-3 * weight.abs().max().item())


# ------------------------------------------------ wrong channels, wrong rank
@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('shape, problem', [
    ((2, C + 1, 3, 3), f'expected {C} channels (num_features)'),
    ((2, C - 1), f'expected {C} channels (num_features)'),
    ((C,), 'expected a 2-D to 5-D input'),
    ((2, C, 1, 1, 1, 1), 'expected a 2-D to 5-D input'),
])
@pytest.mark.parametrize('kind', NORMS)
def test_norm_wrong_channels_or_rank_names_the_layer(kind, shape, problem, training):
    norm = norm_layer(build(kind)).train(training)
    before = state(norm)
    with pytest.raises(ValueError) as info:
        norm(torch.randn(shape, dtype=F64))
    assert str(info.value).startswith(f'{kind}: {problem}')
    assert str(tuple(shape)) in str(info.value)
    for key, value in norm.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_cbn_behind_a_conv_with_other_channels_or_a_linear_layer_names_the_layer():
    model = nn.Sequential(nn.Conv2d(3, C + 1, 1), CBN(C))
    with pytest.raises(ValueError, match=rf'^CBN: expected {C} channels \(num_features\)'):
        model(torch.randn(2, 3, 4, 4))
    # a 2-D input needs rho=0 (no conv to compensate with): the error says so
    model = nn.Sequential(nn.Linear(3, C), CBN(C))
    with pytest.raises(RuntimeError, match=r"CBN '1': its input comes from AddmmBackward0, not "
                                           r'from a convolution.*rho=0'):
        model(torch.randn(5, 3))


@pytest.mark.parametrize('shape', [(2, C + 1, 5, 5), (2, C)])
@pytest.mark.parametrize('kind', CONVS)
def test_conv_wrong_channels_or_rank_names_the_layer(kind, shape):
    conv = build(kind)
    with pytest.raises(RuntimeError) as info:
        conv(torch.randn(shape, dtype=F64))
    assert kind in str(info.value)


@pytest.mark.parametrize('kind', CONVS)
def test_conv_wrong_channels_or_rank_says_what_was_wrong(kind):
    conv = build(kind)
    with pytest.raises(RuntimeError, match=rf'expected input\[2, {C + 1}, 5, 5\] to have {C} '
                                           rf'channels, but got {C + 1} channels'):
        conv(torch.randn(2, C + 1, 5, 5, dtype=F64))
    with pytest.raises(RuntimeError, match=r'Expected 3D \(unbatched\) or 4D \(batched\) input'):
        conv(torch.randn(2, C, dtype=F64))


# ------------------------------------------------- config keys of wrong type
WRONG_TYPES = [
    ('MABN', 'buffer_size', '16'), ('MABN', 'momentum', '0.9'), ('MABN', 'sync_stats', 1),
    ('CBN', 'buffer_num', 2.5), ('CBN', 'two_stage', 'yes'), ('CBN', 'sync_stats', 'no'),
    ('BRN', 'rmax', '3'), ('BRN', 'warmup_iters', 2.5), ('BRN', 'sync_stats', None),
]


@pytest.mark.parametrize('builder', ['MODELS.build', 'build_norm_layer'])
@pytest.mark.parametrize('kind, key, value', WRONG_TYPES)
def test_norm_config_key_of_wrong_type_names_layer_and_key(kind, key, value, builder):
    cfg = {'type': kind, key: value}
    with pytest.raises(TypeError) as info:
        if builder == 'MODELS.build':
            from mmengine.registry import MODELS
            MODELS.build(dict(cfg, num_features=C))
        else:
            from mmcv.cnn import build_norm_layer
            build_norm_layer(cfg, C)
    assert f'{kind}: {key} must be' in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize('builder', ['MODELS.build', 'build_norm_layer'])
@pytest.mark.parametrize('kind', NORMS)
def test_norm_unknown_config_key_names_the_layer(kind, builder):
    with pytest.raises(TypeError, match=rf"{kind}.__init__\(\) got an unexpected keyword "
                                        r"argument 'window'"):
        if builder == 'MODELS.build':
            from mmengine.registry import MODELS
            MODELS.build(dict(type=kind, num_features=C, window=3))
        else:
            from mmcv.cnn import build_norm_layer
            build_norm_layer(dict(type=kind, window=3), C)


def test_wsconv_eps_of_wrong_type_names_layer_and_key():
    from mmengine.registry import MODELS
    with pytest.raises(TypeError, match=r"WSConv: eps must be a number, got '1e-5' \(str\)"):
        MODELS.build(dict(type='WSConv', in_channels=3, out_channels=C, kernel_size=3,
                          eps='1e-5'))
