"""BRN against an independent re-derivation of Batch Renormalization (Ioffe,
NeurIPS 2017)."""
import pytest
import torch
import torch.nn.functional as F

from mmnorm.layers.brn import BRN, renormalized_batch_norm

SCHEDULE = dict(warmup_iters=10, rmax_iters=20, dmax_iters=30, rmax=3.0, dmax=5.0)


class ReferenceBRN:
    """Batch Renormalization (Ioffe, NeurIPS 2017; module docstring of
    mmnorm/layers/brn/layer.py), written out step by step in float64."""

    def __init__(self, channels, eps=1e-5, momentum=0.01, rmax=3.0, dmax=5.0,
                 warmup_iters=5000, rmax_iters=40000, dmax_iters=25000):
        self.eps, self.momentum = eps, momentum
        self.rmax, self.dmax = rmax, dmax
        self.warmup, self.rmax_iters, self.dmax_iters = warmup_iters, rmax_iters, dmax_iters
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.var = torch.ones(channels, dtype=torch.float64)
        self.t = 0

    def bounds(self, t):
        if t <= self.warmup:
            return 1.0, 0.0
        r_max = 1 + (self.rmax - 1) * min((t - self.warmup) / (self.rmax_iters - self.warmup), 1)
        d_max = self.dmax * min((t - self.warmup) / (self.dmax_iters - self.warmup), 1)
        return r_max, d_max

    def train_step(self, x, weight, bias):
        self.t += 1
        dims = [0] + list(range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mu_b = x.mean(dims)
        sigma_b = (((x - mu_b.view(shape)) ** 2).mean(dims) + self.eps).sqrt()
        sigma = (self.var + self.eps).sqrt()
        r_max, d_max = self.bounds(self.t)
        r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
        d = ((mu_b - self.mean) / sigma).clamp(-d_max, d_max).detach()
        x_hat = (x - mu_b.view(shape)) / sigma_b.view(shape) * r.view(shape) + d.view(shape)
        y = weight.view(shape) * x_hat + bias.view(shape)
        self.mean = self.mean + self.momentum * (mu_b.detach() - self.mean)
        new_sigma = sigma + self.momentum * (sigma_b.detach() - sigma)
        self.var = new_sigma ** 2 - self.eps
        return y, r, d

    def eval(self, x, weight, bias):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x_hat = (x - self.mean.view(shape)) / (self.var.view(shape) + self.eps).sqrt()
        return weight.view(shape) * x_hat + bias.view(shape)


def make_layer(channels, **cfg):
    layer = BRN(channels, **cfg).double()
    with torch.no_grad():
        layer.weight.copy_(torch.rand(channels, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(channels, dtype=torch.float64))
    return layer


def test_equals_batch_norm_before_warmup():
    torch.manual_seed(0)
    layer = make_layer(6, warmup_iters=50)
    for _ in range(5):
        x = (torch.randn(2, 6, 5, 7, dtype=torch.float64) * 3 + 1).requires_grad_()
        y = layer(x)
        x_bn = x.detach().clone().requires_grad_()
        weight = layer.weight.detach().clone().requires_grad_()
        bias = layer.bias.detach().clone().requires_grad_()
        y_bn = F.batch_norm(x_bn, None, None, weight, bias, training=True, eps=layer.eps)
        torch.testing.assert_close(y, y_bn, rtol=1e-10, atol=1e-10)
        grad = torch.randn_like(y)
        y.backward(grad)
        y_bn.backward(grad)
        torch.testing.assert_close(x.grad, x_bn.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.weight.grad, weight.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.bias.grad, bias.grad, rtol=1e-9, atol=1e-10)
        layer.zero_grad()


@pytest.mark.parametrize('step, r_bound, d_bound', [
    (10, 1.0, 0.0),    # last warm-up step
    (15, 2.0, 1.25),   # both ramps half-way / quarter-way
    (20, 3.0, 2.5),    # r at its final bound
    (40, 3.0, 5.0),    # both at their final bounds
])
def test_r_and_d_clip_on_schedule(step, r_bound, d_bound):
    layer = make_layer(4, **SCHEDULE)
    # Running statistics far from the batch's, so that r and d both clip.
    layer.running_mean.fill_(-100.0)
    layer.running_var.fill_(1e-4)
    layer.num_batches_tracked.fill_(step - 1)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64) * 10
    reference = ReferenceBRN(4, **SCHEDULE)
    reference.t, reference.mean, reference.var = step - 1, layer.running_mean.clone(), \
        layer.running_var.clone()
    y = layer(x)
    y_ref, r, d = reference.train_step(x, layer.weight, layer.bias)
    assert layer.num_batches_tracked.item() == step
    r_max, d_max = layer.clip_bounds(torch.float64)
    assert r_max.item() == pytest.approx(r_bound)
    assert d_max.item() == pytest.approx(d_bound)
    torch.testing.assert_close(r, torch.full_like(r, r_bound))
    torch.testing.assert_close(d, torch.full_like(d, d_bound))
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)


def test_gradcheck_with_r_and_d_constant():
    torch.manual_seed(1)
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    r = torch.rand(4, dtype=torch.float64) + 0.5
    d = torch.randn(4, dtype=torch.float64)
    def renormalized(x, w, b):
        with torch.no_grad():  # the batch statistics of the perturbed x, as the layer passes them
            var, mean = torch.var_mean(x, (0, 2, 3), correction=0)
        return renormalized_batch_norm(x, w, b, mean, (var + 1e-5).rsqrt(), r, d)

    assert torch.autograd.gradcheck(renormalized, (x, weight, bias))


def test_gradient_equals_reference_after_warmup():
    torch.manual_seed(2)
    layer = make_layer(5, **SCHEDULE)
    reference = ReferenceBRN(5, **SCHEDULE)
    for _ in range(35):
        x = torch.randn(2, 5, 4, 4, dtype=torch.float64) * 2 + 0.5
        x_layer, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        weight = layer.weight.detach().clone().requires_grad_()
        bias = layer.bias.detach().clone().requires_grad_()
        y = layer(x_layer)
        y_ref, _, _ = reference.train_step(x_ref, weight, bias)
        grad = torch.randn_like(y)
        y.backward(grad)
        y_ref.backward(grad)
        torch.testing.assert_close(x_layer.grad, x_ref.grad, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(layer.weight.grad, weight.grad, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(layer.bias.grad, bias.grad, rtol=1e-8, atol=1e-10)
        layer.zero_grad()


@pytest.mark.parametrize('shape', [(8, 3), (4, 3, 9), (2, 3, 5, 6), (2, 3, 2, 3, 4)])
def test_running_statistics_and_eval_match_reference(shape):
    torch.manual_seed(3)
    channels = shape[1]
    layer = make_layer(channels, momentum=0.2, **SCHEDULE)
    reference = ReferenceBRN(channels, momentum=0.2, **SCHEDULE)
    for step in range(45):  # crosses the warm-up and both ramps
        x = torch.randn(shape, dtype=torch.float64) * (1 + step / 10) + step / 5
        y = layer(x)
        y_ref, _, _ = reference.train_step(x, layer.weight, layer.bias)
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(layer.running_mean, reference.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, reference.var, rtol=1e-12, atol=1e-12)
    layer.eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference.eval(x, layer.weight, layer.bias))
    torch.testing.assert_close(layer(x), F.batch_norm(x, layer.running_mean, layer.running_var,
                                                      layer.weight, layer.bias, eps=layer.eps))


def test_state_dict_round_trip_continues_exactly():
    torch.manual_seed(4)
    inputs = [torch.randn(2, 3, 4, 4) * 3 for _ in range(30)]
    uninterrupted = BRN(3, momentum=0.3, **SCHEDULE)
    for x in inputs:
        uninterrupted(x)
    first = BRN(3, momentum=0.3, **SCHEDULE)
    for x in inputs[:12]:
        first(x)
    resumed = BRN(3, momentum=0.3, **SCHEDULE)
    resumed.load_state_dict(first.state_dict())
    assert resumed.num_batches_tracked.item() == 12
    outputs = [resumed(x) for x in inputs[12:]]
    for name, buffer in uninterrupted.state_dict().items():
        assert torch.equal(buffer, resumed.state_dict()[name]), name
    assert all(torch.isfinite(y).all() for y in outputs)


def test_batch_norm_checkpoint_loads_as_is():
    bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    layer = BRN(4)
    assert set(layer.state_dict()) == set(bn.state_dict())
    layer.load_state_dict(bn.state_dict(), strict=True)
    layer.eval()
    bn.eval()
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(layer(x), bn(x))


def test_fresh_layer_is_identity_affine():
    layer = BRN(7)
    assert torch.equal(layer.weight, torch.ones(7))
    assert torch.equal(layer.bias, torch.zeros(7))


# Empty input, wrong shapes and unknown config keys, for every layer: test_bad_input.py
def test_single_value_per_channel_is_finite():
    layer = BRN(3, **SCHEDULE)
    layer.num_batches_tracked.fill_(25)  # r and d active
    x = torch.randn(1, 3, 1, 1, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.running_var).all()


def test_non_finite_batch_keeps_buffers_and_warns_once():
    layer = BRN(3, momentum=0.5)
    x = torch.randn(2, 3, 4, 4)
    x[:, 1] = float('nan')
    x[0, 2, 0, 0] = float('inf')
    with pytest.warns(RuntimeWarning, match='BRN'):
        layer(x)
        layer.train()  # reads the flag the step set on the device
    assert layer.running_mean[1:].eq(0).all() and layer.running_var[1:].eq(1).all()
    assert layer.running_mean[0] != 0  # the finite channel did update
    good = torch.randn(2, 3, 4, 4) + 2
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        y = layer(good)  # no second warning, normal step
        layer.train()
    assert torch.isfinite(y).all()
    assert (layer.running_mean > 0.5).all()


def test_half_input_statistics_in_float32():
    layer = BRN(2)
    x = (torch.randn(2, 2, 8, 8) * 300).to(torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert layer.running_var.dtype == torch.float32
    assert torch.isfinite(layer.running_var).all()
    expected = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(layer.running_mean, 0.01 * expected[1])


@pytest.mark.parametrize('bad, key, error', [
    (dict(eps=0), 'eps', ValueError),
    (dict(momentum=1.5), 'momentum', ValueError),
    (dict(rmax=0.5), 'rmax', ValueError),
    (dict(dmax=-1), 'dmax', ValueError),
    (dict(warmup_iters=2.5), 'warmup_iters', TypeError),
    (dict(warmup_iters=100, rmax_iters=50), 'rmax_iters', ValueError),
    (dict(eps='1e-5'), 'eps', TypeError),
])
def test_bad_config_names_layer_and_key(bad, key, error):
    with pytest.raises(error, match=f'BRN: {key}'):
        BRN(4, **bad)


