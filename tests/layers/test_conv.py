"""CenConv and WSConv: the math against references written here, the NaN fix,
the evaluation cache, registry building, argument checks, copying."""
import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mmnorm.layers.conv import CenConv, WSConv


def centred_reference(weight):
    """W[o] - mean(W[o]), the mean over all (in/groups, kh, kw) of filter o."""
    filter_means = weight.reshape(weight.shape[0], -1).mean(dim=1)
    return weight - filter_means.reshape(-1, 1, 1, 1)


def ws_original(weight, eps=1e-5, std_as_sqrt_of_var=False):
    """Qiao et al.'s formula: unbiased std, eps outside the root.

    torch.std's backward returns 0 for a zero std since PyTorch 1.7 (PR
    #45468); before, as when WS was published, it was NaN there, as the
    backward of sqrt(unbiased var) still is: ``std_as_sqrt_of_var`` gives that.
    """
    flat = weight.reshape(weight.shape[0], -1)
    mean = flat.mean(dim=1).reshape(-1, 1, 1, 1)
    if std_as_sqrt_of_var:
        std = flat.var(dim=1, unbiased=True).sqrt().reshape(-1, 1, 1, 1)
    else:
        std = flat.std(dim=1, unbiased=True).reshape(-1, 1, 1, 1)
    return (weight - mean) / (std + eps)


def conv_with(module, weight, x):
    return F.conv2d(x, weight, module.bias, module.stride, module.padding,
                    module.dilation, module.groups)


def make(cls, *args, seed=0, offset=0.3, **kwargs):
    """A layer whose filters have a clearly non-zero mean."""
    torch.manual_seed(seed)
    module = cls(*args, **kwargs)
    with torch.no_grad():
        module.weight.add_(offset)
    return module


GEOMETRY = dict(stride=2, padding=1, dilation=2)


@pytest.mark.parametrize('groups', [1, 2])
@pytest.mark.parametrize('bias', [True, False])
def test_cenconv_matches_reference(groups, bias):
    conv = make(CenConv, 4, 6, 3, groups=groups, bias=bias, **GEOMETRY)
    x = torch.randn(2, 4, 11, 9)
    expected = conv_with(conv, centred_reference(conv.weight), x)
    out = conv(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # centring matters for this weight, so the comparison above is not vacuous
    assert not torch.allclose(out, conv_with(conv, conv.weight, x), atol=1e-2)


@pytest.mark.parametrize('cls', [CenConv, WSConv])
def test_is_conv2d_and_state_dict_holds_raw_weight(cls):
    conv = make(cls, 4, 6, 3, groups=2)
    assert isinstance(conv, nn.Conv2d)
    conv.eval()
    with torch.no_grad():
        conv(torch.randn(1, 4, 5, 5))  # fills the evaluation cache
    state = conv.state_dict()
    assert list(state) == list(nn.Conv2d(4, 6, 3, groups=2).state_dict())
    assert torch.equal(state['weight'], conv.weight)
    assert state['weight'].mean(dim=(1, 2, 3)).abs().min() > 0.1  # not centred
    plain = nn.Conv2d(4, 6, 3, groups=2)
    plain.load_state_dict(state)
    assert torch.equal(plain.weight, conv.weight)


@pytest.mark.parametrize('groups', [1, 2])
@pytest.mark.parametrize('dtype,atol', [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_wsconv_matches_original_formula(groups, dtype, atol):
    conv = make(WSConv, 4, 6, 3, groups=groups, **GEOMETRY).to(dtype)
    x = torch.randn(2, 4, 11, 9, dtype=dtype)
    torch.testing.assert_close(conv.transform_weight(conv.weight),
                               ws_original(conv.weight), rtol=0, atol=atol)
    expected = conv_with(conv, ws_original(conv.weight), x)
    torch.testing.assert_close(conv(x), expected, rtol=0, atol=atol)


def test_wsconv_eps_is_used():
    conv = make(WSConv, 4, 6, 3, eps=0.5)
    torch.testing.assert_close(conv.transform_weight(conv.weight),
                               ws_original(conv.weight, eps=0.5), rtol=0, atol=1e-5)
    assert 'eps=0.5' in repr(conv)


def test_wsconv_zero_variance_filter_has_finite_gradients():
    conv = make(WSConv, 4, 6, 3)
    with torch.no_grad():
        conv.weight[2].fill_(0.5)  # exactly representable: variance exactly 0
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    upstream = torch.randn(2, 6, 5, 5)
    (conv(x) * upstream).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(conv.weight.grad).all()
    assert torch.equal(conv.transform_weight(conv.weight)[2],
                       torch.zeros_like(conv.weight[2]))

    # The original formula gives NaN here when std's backward is unguarded ...
    weight = conv.weight.detach().clone().requires_grad_(True)
    out = conv_with(conv, ws_original(weight, std_as_sqrt_of_var=True), x.detach())
    (out * upstream).sum().backward()
    assert torch.isnan(weight.grad[2]).all()
    # ... and with torch.std (guarded since PyTorch 1.7) it agrees with the
    # fix on every filter, the degenerate one included.
    weight = conv.weight.detach().clone().requires_grad_(True)
    x_orig = x.detach().clone().requires_grad_(True)
    (conv_with(conv, ws_original(weight), x_orig) * upstream).sum().backward()
    torch.testing.assert_close(conv.weight.grad, weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, x_orig.grad, rtol=1e-4, atol=1e-4)


def test_wsconv_single_element_filter_is_zero_and_finite():
    # depthwise 1x1: each filter has one element, no unbiased variance
    conv = make(WSConv, 3, 3, 1, groups=3)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch warns about std of 1 element
        assert torch.isnan(ws_original(conv.weight)).all()
    transformed = conv.transform_weight(conv.weight)
    assert torch.equal(transformed, torch.zeros_like(transformed))
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = conv(x)
    torch.testing.assert_close(out, conv.bias.reshape(1, 3, 1, 1).expand_as(out))
    out.pow(2).sum().backward()
    assert torch.isfinite(conv.weight.grad).all()
    assert torch.isfinite(x.grad).all()


def test_wsconv_half_weight_statistics_in_float32():
    # variance ~1e-6 is below float16's smallest normal (6e-5): a floor
    # applied in float16 would change the result, the float32 one does not
    torch.manual_seed(0)
    conv = WSConv(8, 4, 3)
    with torch.no_grad():
        conv.weight.normal_(0.0, 1e-3)
    half = conv.half()
    transformed = half.transform_weight(half.weight)
    assert transformed.dtype == torch.float16
    expected = ws_original(half.weight.float()).half()
    torch.testing.assert_close(transformed, expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize('cls', [CenConv, WSConv])
def test_gradcheck(cls):
    conv = make(cls, 4, 2, 3, groups=2, stride=2, padding=1).double()
    x = torch.randn(1, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    weight = conv.weight.detach().clone().requires_grad_(True)

    def run(x, weight):
        return functional_call(conv, {'weight': weight, 'bias': conv.bias}, (x,))

    assert torch.autograd.gradcheck(run, (x, weight))
    conv.eval()  # grad enabled and weights that need it: no cache, same math
    assert torch.autograd.gradcheck(run, (x, weight))


def count_transforms(monkeypatch, conv):
    calls = []
    transform = conv.transform_weight

    def counted(weight):
        calls.append(1)
        return transform(weight)

    monkeypatch.setattr(conv, 'transform_weight', counted)
    return calls


@pytest.mark.parametrize('cls,reference', [(CenConv, centred_reference),
                                           (WSConv, ws_original)])
def test_eval_cache(monkeypatch, cls, reference):
    conv = make(cls, 4, 6, 3, groups=2, **GEOMETRY).eval()
    calls = count_transforms(monkeypatch, conv)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        first = conv(x)
        second = conv(x)
    assert len(calls) == 1
    assert torch.equal(first, second)
    torch.testing.assert_close(first, conv_with(conv, reference(conv.weight), x))
    assert '_eval_weight_cache' not in conv.state_dict()
    assert not any('cache' in name for name, _ in conv.named_buffers())

    # a new weight through load_state_dict
    other = make(cls, 4, 6, 3, groups=2, seed=1, offset=-0.2, **GEOMETRY)
    conv.load_state_dict(other.state_dict())
    with torch.no_grad():
        loaded = conv(x)
    assert len(calls) == 2
    torch.testing.assert_close(loaded, conv_with(conv, reference(other.weight), x))
    assert not torch.allclose(loaded, first, atol=1e-3)

    # an in-place edit under no_grad
    with torch.no_grad():
        conv.weight[1].mul_(-3.0).add_(0.7)
        edited = conv(x)
    assert len(calls) == 3
    torch.testing.assert_close(edited, conv_with(conv, reference(conv.weight), x))
    assert not torch.allclose(edited, loaded, atol=1e-3)

    # a dtype change through .to(), which also drops the old cache
    conv.double()
    assert conv._eval_weight_cache is None
    x64 = x.double()
    with torch.no_grad():
        out64 = conv(x64)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, conv_with(conv, reference(conv.weight), x64))

    # a frozen weight needs no gradient even with grad mode on: cache reused
    conv.weight.requires_grad_(False)
    before = len(calls)
    torch.testing.assert_close(conv(x64), out64, rtol=0, atol=0)
    assert len(calls) == before


@pytest.mark.parametrize('cls,reference', [(CenConv, centred_reference),
                                           (WSConv, ws_original)])
def test_train_mode_recomputes_and_trains_raw_weight(monkeypatch, cls, reference):
    conv = make(cls, 4, 6, 3, groups=2, **GEOMETRY).eval()
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        conv(x)
    assert conv._eval_weight_cache is not None
    conv.train()
    assert conv._eval_weight_cache is None
    calls = count_transforms(monkeypatch, conv)
    with torch.no_grad():
        conv(x)
        conv(x)
    assert len(calls) == 2

    upstream = torch.randn(2, 6, 4, 4)
    (conv(x) * upstream).sum().backward()
    weight = conv.weight.detach().clone().requires_grad_(True)
    (conv_with(conv, reference(weight), x) * upstream).sum().backward()
    assert conv.weight.grad is not None
    torch.testing.assert_close(conv.weight.grad, weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('cls,reference', [(CenConv, centred_reference),
                                           (WSConv, ws_original)])
def test_eval_mode_with_grad_gets_fresh_graph(cls, reference):
    conv = make(cls, 4, 6, 3, groups=2, **GEOMETRY).eval()
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        conv(x)  # fills the cache with a weight that has no graph
    upstream = torch.randn(2, 6, 4, 4)
    weight = conv.weight.detach().clone().requires_grad_(True)
    (conv_with(conv, reference(weight), x) * upstream).sum().backward()
    for step in range(1, 3):  # twice: a cached graph would fail the second time
        (conv(x) * upstream).sum().backward()
        torch.testing.assert_close(conv.weight.grad, step * weight.grad,
                                   rtol=1e-4, atol=1e-5)


def test_cache_from_inference_mode_is_not_reused_for_autograd():
    conv = make(WSConv, 4, 6, 3).eval()
    conv.weight.requires_grad_(False)
    with torch.inference_mode():
        conv(torch.randn(1, 4, 5, 5))
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    conv(x).sum().backward()  # would raise if the inference tensor were reused
    assert torch.isfinite(x.grad).all()


def test_build_through_registries():
    import mmcv.cnn
    from mmcv.cnn import build_conv_layer
    from mmengine.registry import MODELS

    ws = MODELS.build(dict(type='WSConv', in_channels=4, out_channels=8, kernel_size=3))
    assert type(ws) is WSConv and ws.eps == 1e-5
    assert ws.weight.shape == (8, 4, 3, 3)
    ws = build_conv_layer(dict(type='WSConv', eps=1e-3), 4, 8, 3, padding=1)
    assert type(ws) is WSConv and ws.eps == 1e-3 and ws.padding == (1, 1)
    cen = build_conv_layer(dict(type='CenConv'), 4, 8, 3)
    assert type(cen) is CenConv
    assert type(MODELS.build(dict(type='CenConv', in_channels=4, out_channels=8,
                                  kernel_size=1))) is CenConv
    mmcv_ws = build_conv_layer(dict(type='ConvWS'), 4, 8, 3)
    assert type(mmcv_ws) is mmcv.cnn.ConvWS2d


@pytest.mark.parametrize('eps', [0, -1, 0.0, float('nan')])
def test_wsconv_rejects_non_positive_eps(eps):
    with pytest.raises(ValueError, match='WSConv') as info:
        WSConv(4, 8, 3, eps=eps)
    assert 'eps' in str(info.value)


@pytest.mark.parametrize('cls', [CenConv, WSConv])
def test_deepcopy_and_pickle_with_filled_cache(cls):
    conv = make(cls, 4, 6, 3, groups=2).eval()
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        expected = conv(x)
    assert conv._eval_weight_cache is not None

    clone = copy.deepcopy(conv)
    restored = pickle.loads(pickle.dumps(conv))
    # the cache is left behind: its key names the original's storage
    assert clone._eval_weight_cache is None and restored._eval_weight_cache is None
    assert conv._eval_weight_cache is not None
    with torch.no_grad():
        for other in (clone, restored):
            assert type(other) is cls and not other.training
            torch.testing.assert_close(other(x), expected, rtol=0, atol=0)
        # the copies have their own weight and cache
        clone.weight.add_(torch.randn_like(clone.weight))
        assert not torch.allclose(clone(x), expected, atol=1e-3)
        torch.testing.assert_close(conv(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)
