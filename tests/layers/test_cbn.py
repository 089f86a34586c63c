"""CBN (Yao et al., CVPR 2021) against autograd, an independent re-derivation
of the paper's equations, and the binding / state / burn-in contract of
docs/cbn.md."""
import copy
import gc
import io
import math
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mmnorm.layers.cbn import CBN
from mmnorm.layers.conv_statistics import conv_statistic_derivatives, expand_mean_derivative

from conftest import NO_CPU_FLOAT16_AUTOCAST, NO_CPU_FLOAT16_CONV, exit_without_teardown

DIMS = (0, 2, 3)
SHAPE = (1, -1, 1, 1)


def conv_cbn(cin=3, cout=4, dtype=torch.float64, seed=0, conv_bias=True, **cfg):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=conv_bias)
    model = nn.Sequential(conv, CBN(cout, **cfg)).to(dtype)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    return model


def train_step(model, x, grad, optimizer=None):
    y = model(x)
    y.backward(grad)
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad()
    return y.detach()


# ------------------------------------------------------------ derivatives
@pytest.mark.parametrize('stride, padding, dilation, groups', [
    (1, 0, 1, 1), (2, 0, 1, 1), (1, 1, 1, 1), (2, 1, 1, 1), (1, 1, 2, 1), (2, 0, 2, 1),
    (1, 0, 1, 4), (2, 1, 1, 4), (1, 1, 2, 4), (2, 1, 2, 4),
])
@pytest.mark.parametrize('padding_mode', ['zeros', 'reflect'])
def test_derivatives_match_autograd(stride, padding, dilation, groups, padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     padding_mode=padding_mode).double()
    x = torch.randn(3, 8, 13, 11, dtype=torch.float64) + 0.5
    y = conv(x)
    grad_mu, = torch.autograd.grad(y.mean(DIMS).sum(), conv.weight, retain_graph=True)
    grad_nu, = torch.autograd.grad(y.square().mean(DIMS).sum(), conv.weight)
    dmu, dnu = conv_statistic_derivatives(conv, x, y.detach())
    assert dmu.shape == (8, 3, 3)  # compact: shared by the output channels of a group
    torch.testing.assert_close(expand_mean_derivative(dmu, conv.weight.shape, groups), grad_mu,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dnu, grad_nu, rtol=1e-12, atol=1e-12)


def test_derivatives_with_same_padding_and_no_convolution_for_the_mean(monkeypatch):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, (3, 2), padding='same', bias=False).double()
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64)
    y = conv(x)
    grad_mu, = torch.autograd.grad(y.mean(DIMS).sum(), conv.weight, retain_graph=True)
    grad_nu, = torch.autograd.grad(y.square().mean(DIMS).sum(), conv.weight)
    calls = []

    class Convolutions(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if 'convolution' in func.__name__:
                calls.append((func.__name__.split('.')[0], tuple(args[-1])))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(torch.autograd, 'grad', None)  # never used
    with Convolutions():
        dmu, dnu = conv_statistic_derivatives(conv, x, y.detach())
    # one weight-gradient convolution, nothing else
    assert calls == [('convolution_backward', (False, True, False))]
    torch.testing.assert_close(expand_mean_derivative(dmu, conv.weight.shape, 1), grad_mu)
    torch.testing.assert_close(dnu, grad_nu)


# --------------------------------------------------- independent reference
class ReferenceCBN:
    """The equations of Yao et al., CVPR 2021 (module docstring of
    mmnorm/layers/cbn/layer.py) written out step by step in float64, derivatives by
    torch.autograd.grad, history as a Python list (newest first)."""

    def __init__(self, channels, eps=1e-5, momentum=0.1, buffer_num=3, rho=1.0, burnin=0,
                 two_stage=True):
        self.eps, self.momentum, self.k, self.rho = eps, momentum, buffer_num, rho
        self.burnin, self.two_stage = burnin, two_stage
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.var = torch.ones(channels, dtype=torch.float64)
        self.t = 0
        self.past = []

    def window(self, t):
        if self.burnin == 0:
            return self.k
        if self.two_stage:
            return self.k if t > self.burnin else 0
        return int(self.k * min(t / self.burnin, 1))

    def step(self, out, theta, weight, bias):
        self.t += 1
        mu_t = out.mean(DIMS)
        nu_t = (out * out).mean(DIMS)
        var_t = ((out - mu_t.view(SHAPE)) ** 2).mean(DIMS)
        window = self.window(self.t)
        if window == 0:
            mu, sigma2 = mu_t, var_t
        else:
            dmu, = torch.autograd.grad(mu_t.sum(), theta, retain_graph=True)
            dnu, = torch.autograd.grad(nu_t.sum(), theta, retain_graph=True)
            mus, nus, count = [mu_t], [nu_t], 1
            for entry in self.past[:window]:
                shift = theta.detach() - entry['theta']
                m = entry['mu'] + self.rho * (entry['dmu'] * shift).sum((1, 2, 3))
                n = entry['nu'] + self.rho * (entry['dnu'] * shift).sum((1, 2, 3))
                keep = n - m ** 2 >= 0
                mus.append(torch.where(keep, m, 0))
                nus.append(torch.where(keep, n, 0))
                count = count + keep.double()
            mu = sum(mus) / count
            sigma2 = (sum(nus) / count - mu ** 2).clamp(min=0)
            self.past.insert(0, dict(mu=mu_t.detach(), nu=nu_t.detach(), dmu=dmu, dnu=dnu,
                                     theta=theta.detach().clone()))
            del self.past[self.k:]
        y = weight.view(SHAPE) * (out - mu.view(SHAPE)) / (sigma2.view(SHAPE) + self.eps).sqrt() \
            + bias.view(SHAPE)
        m = self.momentum
        n = out.numel() // out.size(1)
        self.mean = (1 - m) * self.mean + m * mu_t.detach()
        self.var = (1 - m) * self.var + m * var_t.detach() * n / (n - 1)
        return y


@pytest.mark.parametrize('cfg', [
    dict(buffer_num=3, rho=1.0, burnin=5, two_stage=True),
    dict(buffer_num=4, rho=0.5, burnin=12, two_stage=False),
    dict(buffer_num=2, rho=0.0, burnin=0),
])
def test_forward_gradients_and_buffers_match_reference_over_50_sgd_steps(cfg):
    model = conv_cbn(**cfg)
    conv, layer = model
    ref_conv = copy.deepcopy(conv)
    ref_weight = layer.weight.detach().clone().requires_grad_()
    ref_bias = layer.bias.detach().clone().requires_grad_()
    reference = ReferenceCBN(4, **cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(list(ref_conv.parameters()) + [ref_weight, ref_bias], lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for step in range(50):
        x = torch.randn(2, 3, 6, 5, generator=gen, dtype=torch.float64) * (1 + step / 25) + 0.3
        grad = torch.randn(2, 4, 6, 5, generator=gen, dtype=torch.float64)
        x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = model(x_ours)
        y_ref = reference.step(ref_conv(x_ref), ref_conv.weight, ref_weight, ref_bias)
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
        y.backward(grad)
        y_ref.backward(grad)
        torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-8, atol=1e-9)
        torch.testing.assert_close(conv.weight.grad, ref_conv.weight.grad, rtol=1e-8, atol=1e-9)
        torch.testing.assert_close(conv.bias.grad, ref_conv.bias.grad, rtol=1e-8, atol=1e-9)
        torch.testing.assert_close(layer.weight.grad, ref_weight.grad, rtol=1e-8, atol=1e-9)
        torch.testing.assert_close(layer.bias.grad, ref_bias.grad, rtol=1e-8, atol=1e-9)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        torch.testing.assert_close(layer.running_mean, reference.mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_var, reference.var, rtol=1e-10, atol=1e-12)
    assert layer.num_batches_tracked.item() == 50
    # The ring holds the reference's history, newest first by age.
    _, _, _, ages = layer.past_statistics()
    for age, entry in enumerate(reference.past):
        slot = int((ages == age).nonzero())
        torch.testing.assert_close(layer.history_mean[slot], entry['mu'], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.history_sqmean[slot], entry['nu'], rtol=1e-10,
                                   atol=1e-12)
        if cfg['rho'] != 0:
            torch.testing.assert_close(layer.history_weight[slot], entry['theta'])
            torch.testing.assert_close(layer.history_dsqmean[slot], entry['dnu'], rtol=1e-10,
                                       atol=1e-12)
            torch.testing.assert_close(
                expand_mean_derivative(layer.history_dmean[slot], entry['theta'].shape, 1),
                entry['dmu'], rtol=1e-10, atol=1e-12)
        else:
            assert layer.history_weight.numel() == 0  # rho = 0 stores no derivative


# -------------------------------------------------------- what it computes
def test_frozen_weights_give_the_statistics_of_the_union_of_the_last_k_plus_1_inputs():
    k = 3
    model = conv_cbn(buffer_num=k, rho=1.0)
    conv, layer = model
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the conv weights are frozen
    gen = torch.Generator().manual_seed(2)
    outs = []
    for step in range(7):
        x = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64) * 2 + step
        with torch.no_grad():
            outs.append(conv(x))
        y = model(x)
        union = torch.cat(outs[-(k + 1):])  # equal batch sizes
        var, mu = torch.var_mean(union, DIMS, correction=0)
        expected = layer.weight.view(SHAPE) * (outs[-1] - mu.view(SHAPE)) \
            / (var.view(SHAPE) + layer.eps).sqrt() + layer.bias.view(SHAPE)
        torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
        if step > 0:  # not the batch's own statistics any more
            own = F.batch_norm(outs[-1], None, None, layer.weight, layer.bias, True, 0.0,
                               layer.eps)
            assert (y - own).abs().max() > 1e-2
        y.backward(torch.randn_like(y))
        opt.step()
        opt.zero_grad()


def test_compensated_old_statistics_are_closer_to_the_current_weights():
    model = conv_cbn(cin=5, cout=6, conv_bias=False, buffer_num=3, rho=1.0)
    conv, layer = model
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(3)
    inputs = []
    for _ in range(4):
        x = torch.randn(2, 5, 7, 7, generator=gen, dtype=torch.float64) + 0.5
        inputs.append(x)
        before = conv.weight.detach().clone()
        grad = torch.randn(2, 6, 7, 7, generator=gen, dtype=torch.float64) / 294  # a mean loss
        train_step(model, x, grad, opt)
        move = (conv.weight - before).norm() / before.norm()
        assert 0.01 < move < 0.1  # a few per cent per step
    theta = conv.weight.detach()
    mu_comp, nu_comp, keep, ages = layer.past_statistics(theta)
    mu_old, nu_old, _, _ = layer.past_statistics(None)
    assert keep.all()
    for slot in range(3):
        x = inputs[3 - int(ages[slot])]
        with torch.no_grad():
            out = conv(x)  # the old input through the current weights
        mu_true, nu_true = out.mean(DIMS), out.square().mean(DIMS)
        err_mu = (mu_comp[slot] - mu_true).abs().max()
        err_mu_naive = (mu_old[slot] - mu_true).abs().max()
        err_nu = (nu_comp[slot] - nu_true).abs().max()
        err_nu_naive = (nu_old[slot] - nu_true).abs().max()
        assert err_mu_naive > 1e-3 and err_nu_naive > 1e-3  # the weights did move
        assert err_mu < 1e-10  # the mean is linear in theta: the Taylor step is exact
        assert err_nu < 0.5 * err_nu_naive, (err_nu, err_nu_naive)


@pytest.mark.parametrize('groups', [1, 2])
def test_compensation_of_every_slot_matches_the_docstring_equations(groups):
    # A random ring (every slot, group and channel different) and a random
    # theta_t; a (3, 2) kernel, so that mixing up kh, kw, groups or slots fails.
    k, cin, cout, rho = 3, 4, 6, 0.7
    weight_shape = (cout, cin // groups, 3, 2)
    gen = torch.Generator().manual_seed(10 + groups)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    layer = CBN(cout, buffer_num=k, rho=rho).double()
    layer.history_mean = rand(k, cout)
    layer.history_sqmean = layer.history_mean.square() + rand(k, cout).abs()
    layer.history_valid = torch.ones(k, cout, dtype=torch.long)
    layer.history_valid[1, 2] = 0
    layer.history_dmean = rand(k, cin, 3, 2)  # compact: rows of group g are shared by its outputs
    layer.history_dsqmean = rand(k, *weight_shape)
    layer.history_weight = rand(k, *weight_shape)
    layer.history_pushes.fill_(7)  # the newest slot is 0 (age 0), then 2, then 1
    theta = rand(*weight_shape)
    ring = {name: buffer.clone() for name, buffer in layer.named_buffers()}

    mu, nu, keep, ages = layer.past_statistics(theta)
    assert ages.tolist() == [0, 2, 1]
    per_group = cout // groups
    expected_mu = torch.empty(k, cout, dtype=torch.float64)
    expected_nu = torch.empty(k, cout, dtype=torch.float64)
    for slot in range(k):
        for c in range(cout):
            g = c // per_group
            delta = theta[c] - layer.history_weight[slot, c]
            dmu = layer.history_dmean[slot, g * (cin // groups):(g + 1) * (cin // groups)]
            expected_mu[slot, c] = layer.history_mean[slot, c] + rho * (dmu * delta).sum()
            expected_nu[slot, c] = (layer.history_sqmean[slot, c]
                                    + rho * (layer.history_dsqmean[slot, c] * delta).sum())
    torch.testing.assert_close(mu, expected_mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nu, expected_nu, rtol=1e-12, atol=1e-12)
    expected_keep = (expected_nu - expected_mu.square() >= 0) & (layer.history_valid == 1)
    assert torch.equal(keep, expected_keep)
    assert 0 < int(keep.sum()) < k * cout  # some kept, some dropped (history_valid[1, 2] = 0)
    # A window of 2 steps leaves out the oldest slot (age 2); nothing is written.
    _, _, keep_2, _ = layer.past_statistics(theta, window=2)
    assert torch.equal(keep_2, expected_keep & (ages < 2)[:, None])
    uncompensated = layer.past_statistics(None)
    assert torch.equal(uncompensated[0], layer.history_mean)
    for name, buffer in layer.named_buffers():
        assert torch.equal(buffer, ring[name]), name


@pytest.mark.parametrize('groups', [1, 2])
def test_grouped_conv_matches_reference_over_sgd_steps(groups):
    torch.manual_seed(groups)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups).double()
    layer = CBN(6, buffer_num=2, rho=1.0).double()
    model = nn.Sequential(conv, layer)
    ref_conv = copy.deepcopy(conv)
    ref_weight = layer.weight.detach().clone().requires_grad_()
    ref_bias = layer.bias.detach().clone().requires_grad_()
    reference = ReferenceCBN(6, buffer_num=2, rho=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(list(ref_conv.parameters()) + [ref_weight, ref_bias], lr=0.1)
    gen = torch.Generator().manual_seed(20 + groups)
    for _ in range(6):
        x = torch.randn(2, 4, 5, 4, generator=gen, dtype=torch.float64) + 0.5
        grad = torch.randn(2, 6, 5, 4, generator=gen, dtype=torch.float64)
        y = model(x)
        y_ref = reference.step(ref_conv(x), ref_conv.weight, ref_weight, ref_bias)
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
        y.backward(grad)
        y_ref.backward(grad)
        torch.testing.assert_close(conv.weight.grad, ref_conv.weight.grad, rtol=1e-8, atol=1e-9)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    assert layer.history_valid.all()


def test_past_entry_with_negative_compensated_variance_is_dropped():
    model = conv_cbn(buffer_num=1, rho=1.0, conv_bias=False)
    conv, layer = model
    x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    train_step(model, x0, torch.randn(2, 4, 4, 4, dtype=torch.float64))
    x1 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    # Forge the stored second moment so that its compensated variance is negative
    # in channel 0 only.
    with torch.no_grad():
        layer.history_sqmean[0, 0] = layer.history_mean[0, 0] ** 2 - 1.0
    y = model(x1)
    with torch.no_grad():
        out = conv(x1)
    own = F.batch_norm(out, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
    torch.testing.assert_close(y[:, 0], own[:, 0])  # channel 0: the past entry is dropped
    assert (y[:, 1:] - own[:, 1:]).abs().max() > 1e-3  # the others average two steps


def test_plain_batch_norm_during_burnin_without_grad_and_in_eval():
    model = conv_cbn(dtype=torch.float32, burnin=3)
    conv, layer = model
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict({k: v for k, v in layer.state_dict().items() if k in bn.state_dict()})
    for step in range(3):
        x = torch.randn(2, 3, 5, 5)
        out = conv(x)
        y = layer(out)
        y_bn = bn(out)
        torch.testing.assert_close(y, y_bn)
        g = torch.randn_like(y)
        ours = torch.autograd.grad(y, [conv.weight, layer.weight, layer.bias], g,
                                   retain_graph=True)
        theirs = torch.autograd.grad(y_bn, [conv.weight, bn.weight, bn.bias], g)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(layer.running_mean, bn.running_mean)
        torch.testing.assert_close(layer.running_var, bn.running_var)
    assert layer.history_pushes.item() == 0 and layer.history_mean.numel() == 0
    # After burn-in, no gradient: plain BN, the counter advances, nothing is stored.
    with torch.no_grad():
        out = conv(torch.randn(2, 3, 5, 5))
        torch.testing.assert_close(layer(out), bn(out))
    assert layer.num_batches_tracked.item() == 4 and layer.history_pushes.item() == 0
    # Eval: BN with the running statistics, no state change.
    model.eval()
    before = copy.deepcopy(layer.state_dict())
    bn.eval()
    out = conv(torch.randn(2, 3, 5, 5))
    torch.testing.assert_close(layer(out), bn(out))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize('two_stage, steps, windows, pushes', [
    (True, [1, 4, 8, 9, 20], [0, 0, 0, 4, 4], [0, 0, 0, 1, 12]),
    (False, [1, 2, 4, 6, 7, 8, 9, 20], [0, 1, 2, 3, 3, 4, 4, 4], [0, 1, 3, 5, 6, 7, 8, 19]),
])
def test_burnin_window_two_stage_and_gradual(two_stage, steps, windows, pushes):
    model = conv_cbn(buffer_num=4, burnin=8, two_stage=two_stage)
    layer = model[1]
    assert [layer.window_size(t) for t in steps] == windows
    seen = {}
    for t in range(1, 21):
        x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
        stored = layer.history_pushes.item()
        if t in steps:
            theta = model[0].weight.detach()
            past = layer.past_statistics(theta, layer.window_size(t))
            used = 0 if past is None else int(past[2][:, 0].sum())
            assert used == min(layer.window_size(t), stored, 4)  # entries averaged at step t
        train_step(model, x, torch.ones(2, 4, 4, 4, dtype=torch.float64))
        seen[t] = layer.history_pushes.item()
    assert [seen[t] for t in steps] == pushes


# ------------------------------------------------------------- robustness
# (empty input, for every layer: test_bad_input.py)


def test_single_value_per_channel_works_and_stays_finite():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), CBN(4, buffer_num=3)).double()
    layer = model[1]
    for _ in range(5):
        x = torch.randn(1, 3, 1, 1, dtype=torch.float64, requires_grad=True)
        y = model(x)
        y.backward(torch.randn_like(y))
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        assert torch.isfinite(model[0].weight.grad).all()
    assert torch.equal(layer.running_var, torch.ones(4, dtype=torch.float64))  # no variance seen
    assert not torch.equal(layer.running_mean, torch.zeros(4, dtype=torch.float64))
    assert layer.history_valid.all()


def test_non_finite_statistic_never_enters_buffers():
    torch.manual_seed(5)
    conv = nn.Conv2d(4, 4, 1, groups=4)  # channel c depends on input channel c only
    layer = CBN(4, buffer_num=2)
    model = nn.Sequential(conv, layer).double()
    for _ in range(2):
        train_step(model, torch.randn(2, 4, 3, 3, dtype=torch.float64),
                   torch.ones(2, 4, 3, 3, dtype=torch.float64))
    before = copy.deepcopy(layer.state_dict())
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    x[0, 1, 0, 0] = math.inf
    with pytest.warns(RuntimeWarning, match='inf or NaN'):
        train_step(model, x, torch.ones(2, 4, 3, 3, dtype=torch.float64))
        layer.report_nonfinite()
    for name in ['running_mean', 'running_var']:
        assert torch.equal(getattr(layer, name)[1], before[name][1])
        assert not torch.equal(getattr(layer, name)[0], before[name][0])
    for name in ['history_mean', 'history_sqmean', 'history_dmean', 'history_dsqmean',
                 'history_weight']:
        assert torch.isfinite(getattr(layer, name)).all(), name
    newest = int((layer.past_statistics()[3] == 0).nonzero())
    assert layer.history_valid[newest].tolist() == [True, False, True, True]
    model[0].weight.grad = None
    # The next finite step trains normally; the poisoned entry is skipped.
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    y = model(x)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    keep = layer.past_statistics(model[0].weight.detach())[2]
    assert not keep[newest, 1] and keep[newest, 0]


@pytest.mark.skipif(bool(NO_CPU_FLOAT16_AUTOCAST), reason=str(NO_CPU_FLOAT16_AUTOCAST))
def test_fp16_autocast_statistics_in_float32():
    torch.manual_seed(6)
    layer = CBN(4, buffer_num=2, rho=0.0)
    x = (torch.randn(2, 4, 6, 6) * 30 + 300).half().requires_grad_()
    for _ in range(3):
        with torch.autocast('cpu', dtype=torch.float16):
            y = layer(x)
        assert y.dtype == torch.float16 and torch.isfinite(y).all()
        y.float().sum().backward()
    assert layer.history_sqmean.dtype == torch.float32
    assert torch.isfinite(layer.history_sqmean).all()  # 300^2 overflows float16
    torch.testing.assert_close(layer.running_mean, torch.full((4,), 300.0) * (1 - 0.9 ** 3),
                               rtol=5e-2, atol=0)
    # With a conv (rho = 1): derivatives and history in float32.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CBN(4, buffer_num=2))
    for _ in range(3):
        with torch.autocast('cpu', dtype=torch.float16):
            y = model(torch.randn(2, 3, 8, 8) * 50)
        y.float().sum().backward()
        assert torch.isfinite(y).all()
    assert model[1].history_dsqmean.dtype == torch.float32
    assert torch.isfinite(model[1].history_dsqmean).all()


def test_rho_zero_accepts_any_rank_and_any_producer():
    layer = CBN(5, buffer_num=2, rho=0.0)
    x = [torch.randn(8, 5, requires_grad=True) for _ in range(3)]
    for xi in x:
        y = layer(xi * 1.0)  # produced by a multiplication, not a module
    var, mu = torch.var_mean(torch.cat([xi.detach() for xi in x]), 0, correction=0)
    torch.testing.assert_close(y, (x[-1] - mu) / (var + layer.eps).sqrt())


# ---------------------------------------------------------------- binding
class Block(nn.Module):
    def __init__(self, **cfg):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.norm = CBN(4, **cfg)

    def forward(self, x):
        return self.norm(self.act(self.conv(x)))


def test_cbn_after_an_activation_names_the_layer_unless_rho_is_zero():
    model = nn.Sequential(nn.Identity(), Block())
    with pytest.raises(RuntimeError,
                       match=r"CBN '1\.norm'.*comes from ReluBackward0, not from a convolution"):
        model(torch.randn(2, 3, 6, 6))
    model = nn.Sequential(nn.Identity(), Block(rho=0.0))
    for _ in range(3):
        y = model(torch.randn(2, 3, 6, 6))
        y.sum().backward()
    assert model[1].norm.history_pushes.item() == 3
    # The error is raised during burn-in already, and in an inplace variant too.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), CBN(4, burnin=100))
    with pytest.raises(RuntimeError, match=r"CBN '2'.*comes from ReluBackward0"):
        model(torch.randn(2, 3, 6, 6))


class InPlaceAfterConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = CBN(4)

    def forward(self, x):
        out = self.conv(x)
        out.mul_(2)
        return self.bn(out)


class LoggingConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 1.0


class CentredConv(nn.Conv2d):
    """A conv that convolves with a transformed weight (like mmnorm's CenConv)."""

    def transformed_weight(self):
        return self.weight - self.weight.mean((1, 2, 3), keepdim=True)

    def forward(self, x):
        return self._conv_forward(x, self.transformed_weight(), self.bias)


def test_in_place_change_and_unknown_conv_subclass_are_refused():
    with pytest.raises(RuntimeError, match=r"CBN 'bn'.*comes from MulBackward0.*changed in place"):
        InPlaceAfterConv()(torch.randn(2, 3, 5, 5))
    model = nn.Sequential(LoggingConv(3, 4, 3), CBN(4))
    with pytest.raises(RuntimeError, match=r"CBN '1'.*comes from MulBackward0"):
        model(torch.randn(2, 3, 5, 5))
    with pytest.raises(RuntimeError, match='comes from MulBackward0'):
        CBN(4)(torch.randn(2, 4, 3, 3, requires_grad=True) * 2)
    with pytest.raises(RuntimeError, match='a leaf tensor'):
        CBN(4)(torch.randn(2, 4, 3, 3, requires_grad=True))
    conv, x = nn.Conv2d(3, 4, 3), torch.randn(2, 3, 5, 5)
    out = conv(x)
    x.mul_(2)  # the conv's saved input changes after the conv ran
    with pytest.raises(RuntimeError, match='input of the convolution that feeds it was changed'):
        CBN(4)(out)
    with pytest.raises(RuntimeError, match='not a plain 2-D one'):
        CBN(4)(nn.Conv1d(3, 4, 3)(torch.randn(2, 3, 5)))


def test_transformed_weight_conv_compensates_in_the_transformed_weight():
    torch.manual_seed(7)
    model = nn.Sequential(CentredConv(3, 5, 3, bias=False), CBN(5, buffer_num=2)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    inputs = [torch.randn(2, 3, 6, 6, dtype=torch.float64) for _ in range(3)]
    for x in inputs:
        train_step(model, x, torch.randn(2, 5, 4, 4, dtype=torch.float64), opt)
    layer = model[1]
    newest = int((layer.past_statistics()[3] == 0).nonzero())
    # theta is the centred weight the conv used, not the raw parameter.
    assert model[0].weight.mean((1, 2, 3)).abs().min() > 1e-3
    torch.testing.assert_close(layer.history_weight.mean((2, 3, 4)),
                               torch.zeros(2, 5, dtype=torch.float64), rtol=0, atol=1e-15)
    mu_comp = layer.past_statistics(model[0].transformed_weight().detach())[0]
    with torch.no_grad():
        mu_true = model[0](inputs[-1]).mean(DIMS)  # newest stored input, current weights
    torch.testing.assert_close(mu_comp[newest], mu_true, rtol=1e-10, atol=1e-10)


def test_binding_survives_deepcopy_dtype_move_and_does_not_keep_models_alive():
    model = conv_cbn(dtype=torch.float32, buffer_num=2)
    for _ in range(3):
        train_step(model, torch.randn(2, 3, 5, 5), torch.ones(2, 4, 5, 5))
    assert model[1].last_conv_weight is model[0].weight
    twin = copy.deepcopy(model)
    for _ in range(2):
        x, g = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5)
        assert torch.equal(train_step(model, x, g), train_step(twin, x, g))
    assert twin[1].last_conv_weight is twin[0].weight
    assert model[1].last_conv_weight is model[0].weight
    # A pickled model (torch.save of the whole module) and a saved activation.
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x, g = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5)
    assert torch.equal(train_step(model, x, g), train_step(loaded, x, g))
    assert loaded[1].last_conv_weight is loaded[0].weight
    buffer = io.BytesIO()
    torch.save(model[0](x), buffer)
    del loaded
    history = model[1].history_dsqmean.clone()
    model.to(torch.float64)
    assert model[1].history_dsqmean.dtype == torch.float64
    assert torch.equal(model[1].history_dsqmean, history.double())
    y = train_step(model, torch.randn(2, 3, 5, 5, dtype=torch.float64),
                   torch.ones(2, 4, 5, 5, dtype=torch.float64))
    assert y.dtype == torch.float64 and model[1].history_pushes.item() == 7
    # Deleting the models frees them: nothing global refers to them.
    refs = [weakref.ref(model), weakref.ref(twin), weakref.ref(twin[0])]
    del model, twin, y
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_state_dict_round_trip_continues_bit_for_bit_in_a_fresh_layer():
    torch.manual_seed(8)
    data = [(torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5)) for _ in range(10)]
    model = conv_cbn(dtype=torch.float32, buffer_num=3, burnin=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, g in data[:5]:
        train_step(model, x, g, opt)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    reference = [train_step(model, x, g, opt) for x, g in data[5:]]
    fresh = conv_cbn(dtype=torch.float32, buffer_num=3, burnin=2, seed=99)
    assert fresh[1].history_weight.numel() == 0
    fresh.load_state_dict(saved[0], strict=True)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    fresh_opt.load_state_dict(saved[1])
    assert fresh[1].num_batches_tracked.item() == 5
    resumed = [train_step(fresh, x, g, fresh_opt) for x, g in data[5:]]
    for a, b in zip(reference, resumed):
        assert torch.equal(a, b)
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key


# Module conversions: the ring (rank 4 and 5 after a push) keeps its values,
# shapes and contiguous layout. Applied to the whole model unless the lambda
# says otherwise: Conv2d's rank-4 weight itself refuses channels_last_3d.
CONVERSIONS = {
    'channels_last': lambda model: model.to(memory_format=torch.channels_last),
    'channels_last_3d': lambda model: model[1].to(memory_format=torch.channels_last_3d),
    'half': lambda model: model.half(),
    'double': lambda model: model.double(),
    'float': lambda model: model.float(),
    'cpu': lambda model: model.to('cpu'),
    'double_channels_last': lambda model: model.to(torch.float64,
                                                   memory_format=torch.channels_last),
}


def _trained_cbn_model():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), CBN(8, buffer_num=3, burnin=0))
    for _ in range(2):  # two pushes into the ring
        train_step(model, torch.randn(2, 3, 6, 6), torch.randn(2, 8, 6, 6))
    return model


@pytest.mark.parametrize('conversion', sorted(CONVERSIONS))
def test_module_conversions_keep_the_history(conversion):
    model = _trained_cbn_model()
    twin = copy.deepcopy(model)  # not converted: the reference for the next step
    before = {key: value.clone() for key, value in model[1].named_buffers()
              if key.startswith('history')}
    assert before['history_dsqmean'].dim() == 5 and before['history_dmean'].dim() == 4
    CONVERSIONS[conversion](model)
    dtype = model[0].weight.dtype
    for key, old in before.items():
        new = getattr(model[1], key)
        # History stays >= float32 (STATISTIC_BUFFERS): float32 under .half().
        want = torch.promote_types(dtype, torch.float32) if old.is_floating_point() \
            else old.dtype
        assert new.dtype == want, key
        assert new.shape == old.shape and new.is_contiguous(), key
        assert torch.equal(new, old.to(want)), key
    if dtype == torch.float16 and NO_CPU_FLOAT16_CONV:
        # The buffers are checked; the extra step needs a float16 conv on the CPU.
        pytest.skip(NO_CPU_FLOAT16_CONV)
    x, g = torch.randn(2, 3, 6, 6), torch.randn(2, 8, 6, 6)
    y = train_step(model, x.to(dtype), g.to(dtype))
    assert y.dtype == dtype and model[1].history_pushes.item() == 3
    tolerance = 1e-2 if dtype == torch.float16 else 1e-4
    torch.testing.assert_close(y.float(), train_step(twin, x, g), rtol=tolerance,
                               atol=tolerance)
    for key in before:
        assert getattr(model[1], key).is_contiguous(), key


def test_channels_last_keeps_the_state_dict():
    model = _trained_cbn_model()
    saved = copy.deepcopy(model.state_dict())
    model.to(memory_format=torch.channels_last)
    after = model.state_dict()
    assert list(after) == list(saved)
    for key, value in saved.items():
        assert after[key].shape == value.shape and torch.equal(after[key], value), key


def test_batch_norm_checkpoint_loads_with_empty_history_and_reset_counter(monkeypatch):
    import mmengine.logging
    notes = []
    monkeypatch.setattr(mmengine.logging, 'print_log', lambda msg, **kw: notes.append(msg))
    bn = nn.BatchNorm2d(4)
    for _ in range(3):
        bn(torch.randn(2, 4, 3, 3))
    model = conv_cbn(dtype=torch.float32)
    train_step(model, torch.randn(2, 3, 5, 5), torch.ones(2, 4, 5, 5))  # a used layer
    model[1].load_state_dict(bn.state_dict(), strict=True)
    assert torch.equal(model[1].running_var, bn.running_var)
    assert model[1].num_batches_tracked.item() == 0
    assert model[1].history_pushes.item() == 0 and model[1].history_weight.numel() == 0
    assert len(notes) == 1 and 'BatchNorm layout' in notes[0] and '3 BN steps' in notes[0]
    train_step(model, torch.randn(2, 3, 5, 5), torch.ones(2, 4, 5, 5))
    assert model[1].history_pushes.item() == 1


def test_config_errors_name_layer_and_key():
    with pytest.raises(ValueError, match='CBN: buffer_num'):
        CBN(4, buffer_num=0)
    with pytest.raises(ValueError, match='CBN: rho'):
        CBN(4, rho=-0.5)
    with pytest.raises(TypeError, match='CBN: burnin'):
        CBN(4, burnin=2.5)
    with pytest.raises(TypeError, match='CBN: two_stage'):
        CBN(4, two_stage=1)
    with pytest.raises(ValueError, match='burnin=5.*burnin_epochs=2'):
        CBN(4, burnin=5, burnin_epochs=2)


# ------------------------------------------------------- burn-in in epochs
def test_burnin_in_epochs_without_the_hook_fails_loudly():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CBN(4, burnin_epochs=8))
    model.eval()
    model(torch.randn(1, 3, 5, 5))  # inference needs no burn-in
    model.train()
    with pytest.raises(RuntimeError, match=r"CBN '1': burnin_epochs=8 .*CBNBurninHook"):
        model(torch.randn(2, 3, 5, 5))
    assert model[1].num_batches_tracked.item() == 0


def test_burnin_hook_converts_with_the_runner_iterations_per_epoch(monkeypatch):
    from mmengine.registry import HOOKS

    import mmnorm.engine.cbn_burnin_hook
    logged = []
    monkeypatch.setattr(mmnorm.engine.cbn_burnin_hook, 'print_log',
                        lambda msg, **kw: logged.append(msg))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CBN(4, burnin_epochs=8, two_stage=False),
                          nn.Conv2d(4, 4, 1), CBN(4, burnin=5))
    runner = SimpleNamespace(model=model, train_dataloader=[None] * 7)
    hook = HOOKS.build(dict(type='CBNBurninHook'))
    assert isinstance(hook, mmnorm.engine.cbn_burnin_hook.CBNBurninHook)
    hook.before_train(runner)
    assert model[1].burnin_iters() == 56 and model[3].burnin_iters() == 5
    assert model[1].window_size(28) == 1  # gradual: int(3 * 28 / 56)
    assert len(logged) == 1 and '8 x 7 iterations per epoch' in logged[0] and '56' in logged[0]


class ToyDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, index):
        gen = torch.Generator().manual_seed(index)
        return dict(inputs=torch.randn(3, 6, 6, generator=gen))


def _toy_model():
    from mmengine.model import BaseModel

    class Toy(BaseModel):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = CBN(4, buffer_num=2, burnin_epochs=1)

        def forward(self, inputs, data_samples=None, mode='loss'):
            y = self.bn(self.conv(torch.stack(inputs) if isinstance(inputs, list) else inputs))
            return dict(loss=(y - 1).square().mean())

    return Toy()


def test_burnin_hook_in_a_real_runner(tmp_path):
    from mmengine.runner import Runner
    runner = Runner(
        model=_toy_model(), work_dir=str(tmp_path),
        train_dataloader=dict(dataset=ToyDataset(), batch_size=2,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=True, max_epochs=2),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        custom_hooks=[dict(type='CBNBurninHook')],
        default_hooks=dict(checkpoint=None, logger=dict(type='LoggerHook', interval=1)))
    runner.train()
    layer = runner.model.bn
    assert layer.burnin_iters() == 3  # 1 epoch x len(train_dataloader) = ceil(5 / 2)
    assert layer.num_batches_tracked.item() == 6
    assert layer.history_pushes.item() == 3  # steps 4, 5, 6
    logs = '\n'.join(p.read_text() for p in tmp_path.rglob('*.log'))
    assert 'burnin_epochs=1 x 3 iterations per epoch' in logs


# ---------------------------------------------------------------- Mask R-CNN
def test_mask_rcnn_every_cbn_uses_the_conv_whose_output_it_normalizes():
    pytest.importorskip('mmdet')
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    register_all_modules()
    norm = dict(type='CBN', requires_grad=True, buffer_num=2)
    import mmdet
    config = Path(mmdet.__file__).parent / '.mim/configs/mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
    cfg = Config.fromfile(config).model
    cfg.backbone.update(norm_cfg=norm, frozen_stages=-1, norm_eval=False, init_cfg=None)
    cfg.neck.norm_cfg = norm
    cfg.roi_head.bbox_head.update(type='Shared4Conv1FCBBoxHead', norm_cfg=norm, num_classes=3)
    cfg.roi_head.mask_head.update(norm_cfg=norm, num_classes=3)
    cfg.train_cfg.rcnn.sampler.num = 32  # RoIs per image: keeps the 4-conv heads cheap
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    model.train()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, CBN)}
    parts = {p: sum(n.startswith(p) for n in layers) for p in
             ['backbone', 'neck', 'roi_head.bbox_head', 'roi_head.mask_head']}
    assert parts == {'backbone': 53, 'neck': 8, 'roi_head.bbox_head': 4,
                     'roi_head.mask_head': 4}

    conv_outputs, calls, handles = {}, [], []

    def record_conv(module, args, output):
        conv_outputs[id(output)] = (module, output)  # keeps the tensor (and its id) alive

    def record_norm(module, args, output):
        calls.append((module, id(args[0]), args[0], module.last_conv_weight))

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(record_conv))
        if isinstance(m, CBN):
            handles.append(m.register_forward_hook(record_norm))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    packed = demo_mm_inputs(2, [[3, 96, 128], [3, 128, 96]], num_items=[3, 2], num_classes=3,
                            with_mask=True)
    for _ in range(2):
        conv_outputs.clear()
        calls.clear()
        data = model.data_preprocessor(packed, True)
        losses = model(**data, mode='loss')
        loss, _ = model.parse_losses(losses)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        called = {id(m) for m, *_ in calls}
        assert called == {id(m) for m in layers.values()}  # every CBN ran
        for layer, input_id, _, used in calls:
            producer, _ = conv_outputs[input_id]
            assert used is producer.weight  # theta is the weight of the conv that ran
    # The compensation ran: every layer has history from both steps.
    assert all(m.history_pushes.item() == 2 for m in layers.values())
    names = {id(m): n for n, m in model.named_modules()}
    names.update({id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)})
    used = {names[id(layer)]: names[id(weight)] for layer, _, _, weight in calls}
    assert used['backbone.bn1'] == 'backbone.conv1'
    assert used['backbone.layer1.0.downsample.1'] == 'backbone.layer1.0.downsample.0'
    assert used['backbone.layer2.0.bn3'] == 'backbone.layer2.0.conv3'
    assert used['neck.fpn_convs.3.bn'] == 'neck.fpn_convs.3.conv'
    assert used['roi_head.mask_head.convs.3.bn'] == 'roi_head.mask_head.convs.3.conv'
    for handle in handles:
        handle.remove()


# ---------------------------------------------------------------------- DDP
def _ddp_worker(rank, world_size, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank,
                            world_size=world_size)
    torch.manual_seed(0)  # the same initial weights on both ranks
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), CBN(4, buffer_num=2))
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(100 + rank)
    means = []
    model[0].register_forward_hook(lambda m, a, out: means.append(out.detach().mean(DIMS)))
    for _ in range(4):
        x = torch.randn(2, 3, 6, 6, generator=gen) + 3 * rank
        y = ddp(x)
        (y * torch.randn(y.shape, generator=gen)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    layer = model[1]
    ages = layer.past_statistics()[3]
    torch.save(dict(weight=model[0].weight.detach(), history=layer.history_mean.clone(),
                    ages=ages, means=means, pushes=layer.history_pushes.item(),
                    bound=layer.last_conv_weight is model[0].weight), f'{out_dir}/rank{rank}.pt')
    exit_without_teardown()



def test_ddp_two_processes_each_rank_keeps_its_own_history(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / 'init'), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    torch.testing.assert_close(results[0]['weight'], results[1]['weight'])  # synced gradients
    assert not torch.allclose(results[0]['history'], results[1]['history'])
    for res in results:
        assert res['pushes'] == 4 and res['bound']
        for age in range(2):  # the rank's own last two batches
            slot = int((res['ages'] == age).nonzero())
            torch.testing.assert_close(res['history'][slot], res['means'][-1 - age])
