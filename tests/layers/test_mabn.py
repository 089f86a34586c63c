"""Tests of MABN: the equations of Yan et al., ICLR 2020 (module docstring of
mmnorm/layers/mabn/layer.py) and the guarantees of docs/mabn.md."""
import copy
import io
import logging
import warnings

import pytest
import torch

from mmnorm.layers.mabn import MABN

F64 = torch.float64
C = 3
# Settings under which a few dozen steps cross every phase: the window is full
# after t = 4, warm-up ends at t = 6, r leaves 1 after t = 10.
SMALL = dict(buffer_size=4, warmup_iters=6, renorm_start_iter=10)


# --------------------------------------------------------------------------
# An independent re-derivation of the paper's equations, step by step.
# --------------------------------------------------------------------------
class ReferenceMABN:
    """MABN's equations (Yan et al., ICLR 2020) written out literally, one
    numbered step per line, for a batch x of shape (N, C, *). It shares no
    code with mmnorm."""

    def __init__(self, num_features, eps=1e-5, momentum=0.98, buffer_size=16, warmup_iters=100,
                 renorm_start_iter=1000, rmax=5.0, dtype=F64):
        self.eps, self.momentum, self.m = eps, momentum, buffer_size
        self.warmup_iters, self.renorm_start_iter, self.rmax = warmup_iters, renorm_start_iter, rmax
        self.t = 0
        self.running_var = torch.ones(num_features, dtype=dtype)
        self.buffer_x2 = torch.zeros(buffer_size, num_features, dtype=dtype)
        self.buffer_gz = torch.zeros(buffer_size, num_features, dtype=dtype)
        self.history = []  # (t, early, r) per forward

    def _early(self, t):
        return t <= self.m or t < self.warmup_iters

    def forward(self, x, weight, bias):
        self.t += 1
        t = self.t
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        chi2 = (x ** 2).mean(dim=dims)                                    # 1
        self.buffer_x2[t % self.m] = chi2                                 # 2
        if self._early(t):                                                # 3
            v = chi2
        else:
            v = sum(self.buffer_x2[i] for i in range(self.m)) / self.m
        z = x / torch.sqrt(v + self.eps).view(shape)                      # 4
        if t <= max(self.renorm_start_iter, self.warmup_iters):           # 5
            r = torch.ones_like(v)
        else:
            r = torch.sqrt(v + self.eps) / torch.sqrt(self.running_var + self.eps)
            r = torch.minimum(torch.maximum(r, torch.full_like(r, 1 / self.rmax)),
                              torch.full_like(r, self.rmax))
        y = weight.view(shape) * (r.view(shape) * z) + bias.view(shape)   # 6
        self.running_var = (self.momentum * self.running_var              # 7
                            + (1 - self.momentum) * v)
        self.history.append((t, self._early(t), r.clone()))
        return y, dict(t=t, z=z, v=v, r=r, weight=weight, dims=dims, shape=shape)

    def backward(self, saved, dy):
        t, z, v, r, shape, dims = (saved[k] for k in ('t', 'z', 'v', 'r', 'shape', 'dims'))
        g = dy * saved['weight'].view(shape) * r.view(shape)              # 1
        psi_t = (g * z).mean(dim=dims)                                    # 2
        self.buffer_gz[t % self.m] = psi_t                                # 3
        if self._early(t):                                                # 4
            psi = psi_t
        else:
            psi = sum(self.buffer_gz[i] for i in range(self.m)) / self.m
        dx = (g - z * psi.view(shape)) / torch.sqrt(v + self.eps).view(shape)   # 5
        dweight = (dy * r.view(shape) * z).sum(dim=dims)                  # 6
        dbias = dy.sum(dim=dims)
        return dx, dweight, dbias


def layer_step(layer, x, dy):
    """One training call of the layer: output, input grad, weight and bias grads."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


def random_affine(layer, seed=0, dtype=None):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(0.5 + torch.rand(layer.num_features, generator=gen))
        layer.bias.copy_(torch.randn(layer.num_features, generator=gen))
    return layer


def assert_state(layer, ref, **tol):
    assert int(layer.num_batches_tracked) == ref.t
    torch.testing.assert_close(layer.running_var, ref.running_var, **tol)
    torch.testing.assert_close(layer.buffer_x2, ref.buffer_x2, **tol)
    torch.testing.assert_close(layer.buffer_gz, ref.buffer_gz, **tol)


# --------------------------------------------------------------------------
# Construction and buffers
# --------------------------------------------------------------------------
def test_buffers_names_shapes_and_dtypes():
    layer = MABN(5, buffer_size=7)
    state = layer.state_dict()
    assert set(state) == {'weight', 'bias', 'running_var', 'num_batches_tracked', 'buffer_x2',
                          'buffer_gz'}
    assert layer.running_mean is None
    assert state['running_var'].shape == (5,)
    assert state['buffer_x2'].shape == state['buffer_gz'].shape == (7, 5)
    assert state['num_batches_tracked'].shape == ()
    for key in ('running_var', 'buffer_x2', 'buffer_gz'):
        assert state[key].dtype == torch.float32
    # step_flags: the non-finite flag, not saved (see test_nonfinite_flag_is_reported_rarely)
    assert {k for k, _ in layer.named_buffers()} == {'running_var', 'num_batches_tracked',
                                                     'buffer_x2', 'buffer_gz', 'step_flags'}
    counters = ('num_batches_tracked', 'step_flags')
    assert all(b.dtype == F64 for k, b in layer.double().named_buffers() if k not in counters)
    half = MABN(5).half()
    assert half.weight.dtype == torch.float16
    assert all(b.dtype == torch.float32 for k, b in half.named_buffers() if k not in counters)
    assert all(b.dtype == torch.float32 for k, b in MABN(5).to(torch.bfloat16).named_buffers()
               if k not in counters)


def test_is_a_batchnorm_and_resets():
    from torch.nn.modules.batchnorm import _BatchNorm
    layer = MABN(4, buffer_size=2)
    assert isinstance(layer, _BatchNorm) and layer._abbr_ == 'bn'
    for _ in range(3):
        layer_step(layer, torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3))
    assert layer.buffer_gz.abs().sum() > 0
    layer.reset_running_stats()
    assert int(layer.num_batches_tracked) == 0
    assert torch.equal(layer.running_var, torch.ones(4))
    assert not layer.buffer_x2.any() and not layer.buffer_gz.any()
    layer.reset_parameters()
    assert torch.equal(layer.weight, torch.ones(4)) and not layer.bias.any()


def test_registered_in_mmengine_models():
    from mmengine.registry import MODELS
    layer = MODELS.build(dict(type='MABN', num_features=8, buffer_size=4))
    assert type(layer) is MABN and layer.buffer_size == 4


@pytest.mark.parametrize('key, value, error', [
    ('buffer_size', 0, ValueError),
    ('buffer_size', -3, ValueError),
    ('buffer_size', 2.0, TypeError),
    ('buffer_size', True, TypeError),
    ('warmup_iters', -1, ValueError),
    ('warmup_iters', 1.5, TypeError),
    ('renorm_start_iter', -1, ValueError),
    ('renorm_start_iter', '1000', TypeError),
    ('rmax', 0.5, ValueError),
    ('rmax', None, TypeError),
    ('momentum', 1.5, ValueError),
    ('momentum', -0.1, ValueError),
    ('eps', 0, ValueError),
    ('num_features', 0, ValueError),
    ('num_features', 4.0, TypeError),
])
def test_bad_config_names_layer_and_key(key, value, error):
    kwargs = dict(num_features=4)
    kwargs[key] = value
    with pytest.raises(error) as info:
        MABN(**kwargs)
    assert 'MABN' in str(info.value) and key in str(info.value)


def test_accepts_ranks_2_to_5():
    layer = MABN(4, buffer_size=2, warmup_iters=0)
    for shape in [(3, 4), (2, 4, 5), (2, 4, 3, 3), (2, 4, 2, 2, 2)] * 2:
        y, dx, dw, db = layer_step(layer, torch.randn(shape), torch.randn(shape))
        assert y.shape == dx.shape == shape
        assert all(torch.isfinite(t).all() for t in (y, dx, dw, db))
    assert int(layer.num_batches_tracked) == 8


# --------------------------------------------------------------------------
# Early phase: the custom backward is the true gradient of the forward
# --------------------------------------------------------------------------
def gradcheck_at(layer, t, shape, running_var=None, seed=0):
    """gradcheck of (x, weight, bias) -> layer(x) at step t: every evaluation
    of the function is the same step t (the counter, and running_var when
    given, are reset before each call)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=F64) + 0.3).requires_grad_()
    weight = (0.5 + torch.rand(shape[1], generator=gen, dtype=F64)).requires_grad_()
    bias = torch.randn(shape[1], generator=gen, dtype=F64).requires_grad_()

    def fn(x, weight, bias):
        layer.num_batches_tracked.fill_(t - 1)
        if running_var is not None:
            layer.running_var.copy_(running_var)
        return torch.func.functional_call(layer, {'weight': weight, 'bias': bias}, (x,))

    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    assert torch.autograd.gradcheck(fn, (x, weight, bias), fast_mode=True)


@pytest.mark.parametrize('t', [1, 2, 16, 17, 99])
def test_gradcheck_early_phase(t):
    # defaults: t <= 16 fills the window, t < 100 is warm-up; r = 1
    layer = MABN(C).double()
    for _ in range(5):  # the window holds other values; early steps must ignore them
        x, dy = torch.randn(2, C, 4, 4, dtype=F64), torch.randn(2, C, 4, 4, dtype=F64)
        layer_step(layer, x * 3, dy)
    gradcheck_at(layer, t, (2, C, 3, 4))


@pytest.mark.parametrize('shape', [(5, C), (2, C, 6), (1, C, 2, 2, 2), (1, C, 1, 1)])
def test_gradcheck_early_phase_other_shapes(shape):
    gradcheck_at(MABN(C).double(), 3, shape)


def test_gradcheck_early_phase_with_clipped_r():
    # t = 6: still early (t <= m = 8) but r is on (t > max(4, 0)); a tiny
    # running_var clips r to rmax, a constant, so the forward is differentiable.
    layer = MABN(C, buffer_size=8, warmup_iters=0, renorm_start_iter=4, rmax=2.5).double()
    gradcheck_at(layer, 6, (2, C, 3, 3), running_var=torch.full((C,), 1e-3, dtype=F64))
    layer.num_batches_tracked.fill_(5)
    layer.running_var.fill_(1e-3)
    y = layer(torch.ones(1, C, 1, 1, dtype=F64))  # weight 1, bias 0
    # x = 1: z = 1 / sqrt(1 + eps), r = 2.5 -> y = 2.5 * weight * z + bias
    torch.testing.assert_close(y.flatten(), torch.full((C,), 2.5 / (1 + 1e-5) ** 0.5, dtype=F64))


# --------------------------------------------------------------------------
# Every phase against the re-derivation
# --------------------------------------------------------------------------
def compare_with_reference(cfg, steps, seed=1, spike_at=None):
    """Run the layer and ReferenceMABN side by side for ``steps`` steps of random
    inputs and incoming gradients and compare everything at every step.
    Returns the reference (its history has t, early and r per step)."""
    layer = random_affine(MABN(C, **cfg).double())
    ref = ReferenceMABN(C, **cfg)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        n = 1 + step % 2
        h, w = (int(s) for s in torch.randint(1, 6, (2,), generator=gen))
        # per-channel scales and offsets; an overall level that changes every
        # 40 steps (x1, x30, x1, x1/30) until step 800, then one spike (x100)
        # at step spike_at: r = sqrt(v / running_var) is clipped at rmax while
        # the spike is in the window, and at 1/rmax once it has left the
        # window but not yet running_var; otherwise r moves freely around 1
        level = (1.0, 30.0, 1.0, 1 / 30)[(step // 40) % 4] if step < 800 else 1.0
        if step == spike_at:
            level = 100.0
        scale = (0.5 + torch.rand(C, generator=gen, dtype=F64)).view(1, C, 1, 1) * level
        x = torch.randn(n, C, h, w, generator=gen, dtype=F64) * scale + 0.2
        dy = torch.randn(n, C, h, w, generator=gen, dtype=F64)

        weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
        y, dx, dweight, dbias = layer_step(layer, x, dy)
        ry, saved = ref.forward(x, weight, bias)
        rdx, rdweight, rdbias = ref.backward(saved, dy)
        msg = f'step {step + 1}'
        torch.testing.assert_close(y, ry, rtol=1e-10, atol=1e-12, msg=msg)
        torch.testing.assert_close(dx, rdx, rtol=1e-9, atol=1e-12, msg=msg)
        torch.testing.assert_close(dweight, rdweight, rtol=1e-9, atol=1e-12, msg=msg)
        torch.testing.assert_close(dbias, rdbias, rtol=1e-10, atol=1e-12, msg=msg)
        assert_state(layer, ref, rtol=1e-10, atol=1e-14)
        with torch.no_grad():  # SGD keeps weight and bias moving, as in training
            layer.weight.sub_(0.01 * dweight.clamp(-1, 1))
            layer.bias.sub_(0.01 * dbias.clamp(-1, 1))
    return ref


def test_matches_reference_over_1200_steps():
    # the defaults: window full after t = 16, warm-up until t = 99, r = 1 until t = 1000
    ref = compare_with_reference(dict(buffer_size=16, warmup_iters=100, renorm_start_iter=1000,
                                      rmax=5.0), steps=1200, spike_at=1100)
    steps = 1200
    # every phase was crossed, and the clipping was exercised on both sides
    early = [e for _, e, _ in ref.history]
    assert early.count(True) == 99 and early.count(False) == steps - 99
    r_late = torch.stack([r for t, _, r in ref.history if t > 1000])
    assert torch.all(torch.stack([r for t, _, r in ref.history if t <= 1000]) == 1)
    assert (r_late == 5.0).any() and (r_late == 0.2).any()
    assert ((r_late > 0.2) & (r_late < 5.0) & (r_late != 1)).any()


def test_matches_reference_when_the_window_outlasts_warmup():
    # buffer_size > warmup_iters: the t <= m half of the rule decides the phase
    ref = compare_with_reference(dict(buffer_size=16, warmup_iters=4, renorm_start_iter=40,
                                      rmax=3.0), steps=300, seed=2, spike_at=200)
    early = [t for t, e, _ in ref.history if e]
    assert early == list(range(1, 17))
    r_late = torch.stack([r for t, _, r in ref.history if t > 40])
    assert (r_late == 3.0).any() and (r_late == 1 / 3.0).any()


def test_eval_is_per_channel_scale_and_changes_nothing():
    layer = random_affine(MABN(C, **SMALL).double())
    for _ in range(12):
        x, dy = torch.randn(2, C, 4, 4, dtype=F64), torch.randn(2, C, 4, 4, dtype=F64)
        layer_step(layer, x * 2, dy)
    assert not torch.equal(layer.running_var, torch.ones(C, dtype=F64))
    before = copy.deepcopy(layer.state_dict())
    layer.eval()
    x = torch.randn(2, C, 5, 5, dtype=F64, requires_grad=True)
    y = layer(x)
    expect = (layer.weight.view(1, C, 1, 1) * x / torch.sqrt(layer.running_var + layer.eps).view(
        1, C, 1, 1) + layer.bias.view(1, C, 1, 1))
    torch.testing.assert_close(y, expect, rtol=1e-12, atol=1e-12)
    y.sum().backward()  # eval mode is differentiable (e.g. norm_eval with trainable affine)
    assert x.grad is not None and layer.weight.grad is not None
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


# --------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------
def test_autocast_bfloat16():
    layer = random_affine(MABN(4, buffer_size=2, warmup_iters=0))
    full = copy.deepcopy(layer)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(2, 4, 5, 5, generator=gen) * 3
        dy = torch.randn(2, 4, 5, 5, generator=gen)
        xr = x.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = layer(xr)
        assert y.dtype == torch.bfloat16
        y.backward(dy.bfloat16())
        assert xr.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
        # the statistic is the float32 second moment of the float32 input
        assert layer.buffer_x2.dtype == torch.float32
        torch.testing.assert_close(layer.buffer_x2[(step + 1) % 2], (x * x).mean((0, 2, 3)))
        y32, dx32, _, _ = layer_step(full, x, dy.bfloat16().float())
        torch.testing.assert_close(y.float(), y32, rtol=1e-2, atol=2e-2)
        torch.testing.assert_close(xr.grad, dx32, rtol=1e-4, atol=1e-5)
        layer.zero_grad()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert layer(torch.randn(2, 4, 3, 3).bfloat16()).dtype == torch.bfloat16
        assert layer.eval()(torch.randn(2, 4, 3, 3)).dtype == torch.bfloat16
    assert layer(torch.randn(2, 4, 3, 3)).dtype == torch.float32


def fp16_input_near_300(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (320 + 10 * torch.randn(2, 4, 5, 5, generator=gen)).half()
    assert torch.isinf(x * x).all()  # x^2 overflows fp16: the layer must not square in fp16
    return x


@pytest.mark.parametrize('half_module', [False, True])
def test_float16_input_around_300(half_module):
    layer = random_affine(MABN(4))
    full = copy.deepcopy(layer)
    if half_module:
        layer.half()
    x = fp16_input_near_300()
    dy = torch.randn(x.shape).half()
    xr = x.clone().requires_grad_()
    y = layer(xr)
    y.backward(dy)
    assert y.dtype == xr.grad.dtype == torch.float16
    chi2 = (x.float() ** 2).mean((0, 2, 3))
    assert chi2.min() > 65504
    assert layer.buffer_x2.dtype == torch.float32
    torch.testing.assert_close(layer.buffer_x2[1], chi2)
    torch.testing.assert_close(layer.running_var, 0.98 + 0.02 * chi2)
    y32, dx32, dw32, db32 = layer_step(full, x.float(), dy.float())
    assert torch.isfinite(y).all() and torch.isfinite(xr.grad).all()
    torch.testing.assert_close(y.float(), y32, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(xr.grad.float(), dx32, rtol=1e-2, atol=1e-6)
    torch.testing.assert_close(layer.buffer_gz, full.buffer_gz, rtol=1e-3, atol=1e-6)
    if not half_module:
        torch.testing.assert_close(layer.weight.grad, dw32, rtol=1e-3, atol=1e-3)
    layer.eval()
    torch.testing.assert_close(layer(x).float(), full.eval()(x.float()), rtol=2e-3, atol=2e-3)


def cpu_float16_autocast_problem():
    """Why this torch's CPU autocast does not run float16, or None. torch 2.1
    has bfloat16 only there: entering ``torch.autocast('cpu', dtype=float16)``
    raises ("Currently, AutoCast only support Bfloat16 as the
    autocast_cpu_dtype"); a torch that warns and disables autocast instead, or
    has no float16 matmul on the CPU, is caught by the matmul (an op CPU
    autocast runs in its low dtype). torch 2.13 runs it."""
    where = f'torch {torch.__version__}: CPU autocast has no float16'
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        try:
            with torch.autocast('cpu', dtype=torch.float16):
                out = torch.ones(2, 2) @ torch.ones(2, 2)
        except RuntimeError as error:
            return f'{where} ({str(error).splitlines()[0]})'
    if out.dtype != torch.float16:
        said = '; '.join(str(w.message).splitlines()[0] for w in caught) or 'no warning'
        return f'{where}: a matmul under it gave {out.dtype} ({said})'
    return None


NO_CPU_FLOAT16_AUTOCAST = cpu_float16_autocast_problem()


@pytest.mark.skipif(bool(NO_CPU_FLOAT16_AUTOCAST), reason=str(NO_CPU_FLOAT16_AUTOCAST))
def test_float16_autocast_around_300():
    layer = MABN(4)
    x = fp16_input_near_300().float()
    with torch.autocast('cpu', dtype=torch.float16):
        y = layer(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(layer.buffer_x2[1], (x ** 2).mean((0, 2, 3)))


# --------------------------------------------------------------------------
# Degenerate inputs
# --------------------------------------------------------------------------
# (empty input and wrong shapes, for every layer: test_bad_input.py)


@pytest.mark.parametrize('shape', [(1, C, 1, 1), (1, C)])
def test_single_value_per_channel(shape):
    layer = random_affine(MABN(C, buffer_size=2, warmup_iters=3, renorm_start_iter=5).double())
    ref = ReferenceMABN(C, buffer_size=2, warmup_iters=3, renorm_start_iter=5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):  # crosses warm-up and the renormalisation start
        x = torch.randn(shape, generator=gen, dtype=F64)
        dy = torch.randn(shape, generator=gen, dtype=F64)
        if _ == 4:
            x = torch.zeros(shape, dtype=F64)  # chi2 = 0: only eps keeps it finite
        y, dx, dw, db = layer_step(layer, x, dy)
        assert all(torch.isfinite(t).all() for t in (y, dx, dw, db))
        ry, saved = ref.forward(x, layer.weight.detach(), layer.bias.detach())
        rdx, rdw, _ = ref.backward(saved, dy)
        torch.testing.assert_close(y, ry)
        torch.testing.assert_close(dx, rdx)
        torch.testing.assert_close(dw, rdw)
    assert_state(layer, ref)


def count_nonfinite_warnings(records):
    return sum(issubclass(w.category, RuntimeWarning) and 'inf or NaN' in str(w.message)
               for w in records)


@pytest.mark.parametrize('phase_steps', [1, 9])  # bad step in the early / moving-average phase
def test_nonfinite_input_never_enters_buffers(phase_steps):
    cfg = dict(buffer_size=4, warmup_iters=0, renorm_start_iter=6)
    layer = random_affine(MABN(C, **cfg).double())
    ref = ReferenceMABN(C, **cfg)
    gen = torch.Generator().manual_seed(0)

    def batch():
        return (torch.randn(2, C, 3, 3, generator=gen, dtype=F64),
                torch.randn(2, C, 3, 3, generator=gen, dtype=F64))

    for _ in range(phase_steps):
        x, dy = batch()
        layer_step(layer, x, dy)
        ref.backward(ref.forward(x, layer.weight.detach(), layer.bias.detach())[1], dy)
    x, dy = batch()
    x[0, 0, 1, 1] = float('inf')  # channel 0: chi2 = inf
    x[1, 1, 0, 2] = float('nan')  # channel 1: chi2 = NaN; channel 2 stays finite
    before = copy.deepcopy(layer.state_dict())
    t = phase_steps + 1
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter('always')
        y, dx, _, _ = layer_step(layer, x, dy)
        assert count_nonfinite_warnings(records) == 0  # nothing is read during the step
        layer.report_nonfinite()
    assert count_nonfinite_warnings(records) == 1
    assert int(layer.num_batches_tracked) == t
    for key in ('buffer_x2', 'buffer_gz', 'running_var'):
        assert torch.isfinite(layer.state_dict()[key]).all(), key
    # the bad channels kept the old row and running_var; the finite one is updated
    for key in ('buffer_x2', 'buffer_gz'):
        assert torch.equal(layer.state_dict()[key][t % 4, :2], before[key][t % 4, :2]), key
        assert not torch.equal(layer.state_dict()[key][t % 4, 2], before[key][t % 4, 2]), key
    if t <= 4:  # early phase: v_t = chi2_t is non-finite; running_var keeps its value
        assert torch.equal(layer.running_var[:2], before['running_var'][:2])
    else:  # moving-average phase: v_t is the finite window mean (stale row included)
        v = layer.buffer_x2[:, :2].mean(0)
        torch.testing.assert_close(layer.running_var[:2],
                                   0.98 * before['running_var'][:2] + 0.02 * v)
    # channel 2 is computed as usual (rows and output)
    ry, saved = ref.forward(x, layer.weight.detach(), layer.bias.detach())
    rdx, _, _ = ref.backward(saved, dy)
    torch.testing.assert_close(y[:, 2], ry[:, 2])
    torch.testing.assert_close(dx[:, 2], rdx[:, 2])
    torch.testing.assert_close(layer.buffer_x2[:, 2], ref.buffer_x2[:, 2])
    if t > 4:
        # moving-average phase: v_t of a bad channel is the mean of its m rows
        # (one of them stale), so the output and input gradient stay finite
        # wherever the input is
        for c in (0, 1):
            v = layer.buffer_x2[:, c].mean()
            r = (torch.sqrt(v + layer.eps) / torch.sqrt(before['running_var'][c] + layer.eps))
            r = r.clamp(1 / layer.rmax, layer.rmax)
            good = torch.isfinite(x[:, c])
            expect = layer.weight[c] * r * x[:, c] / torch.sqrt(v + layer.eps) + layer.bias[c]
            torch.testing.assert_close(y[:, c][good], expect[good].detach())
            assert torch.isfinite(dx[:, c][good]).all() and not torch.isfinite(dx[:, c]).all()
    else:
        # early phase: v_t = chi2_t itself, non-finite, exactly as the equations
        # compute it (r = 1): channel 0 (chi2 = inf) gives bias, NaN at the
        # inf; channel 1 (chi2 = NaN) is NaN
        torch.testing.assert_close(y, ry, equal_nan=True)
        torch.testing.assert_close(dx, rdx, equal_nan=True)
        assert torch.isnan(y[:, 1]).all() and torch.isnan(y[0, 0, 1, 1])
    # the next finite steps train normally, without another warning
    ref.buffer_x2, ref.buffer_gz = layer.buffer_x2.clone(), layer.buffer_gz.clone()
    ref.running_var = layer.running_var.clone()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter('always')
        for _ in range(6):
            x, dy = batch()
            weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
            y, dx, dw, db = layer_step(layer, x, dy)
            ry, saved = ref.forward(x, weight, bias)
            rdx, rdw, rdb = ref.backward(saved, dy)
            torch.testing.assert_close(y, ry)
            torch.testing.assert_close(dx, rdx)
            torch.testing.assert_close(dw, rdw)
            assert_state(layer, ref)
        layer.report_nonfinite()
    assert count_nonfinite_warnings(records) == 0


def test_nonfinite_gradient_never_enters_buffer_gz():
    # an fp16 GradScaler overflow: inf in dy. The row keeps its value, the
    # gradient is non-finite (so the scaler skips the step), later steps are fine.
    layer = random_affine(MABN(C, buffer_size=2, warmup_iters=0))
    for _ in range(3):
        layer_step(layer, torch.randn(2, C, 3, 3), torch.randn(2, C, 3, 3))
    before = layer.buffer_gz.clone()
    dy = torch.randn(2, C, 3, 3)
    dy[0, 1, 0, 0] = float('inf')
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter('always')
        _, dx, _, _ = layer_step(layer, torch.randn(2, C, 3, 3), dy)
        assert not torch.isfinite(dx[:, 1]).all()
        assert torch.equal(layer.buffer_gz[0, 1], before[0, 1])
        assert not torch.equal(layer.buffer_gz[0, [0, 2]], before[0, [0, 2]])
        assert torch.isfinite(layer.buffer_gz).all()
        for _ in range(3):
            y, dx, dw, db = layer_step(layer, torch.randn(2, C, 3, 3), torch.randn(2, C, 3, 3))
            assert all(torch.isfinite(t).all() for t in (y, dx, dw, db))
        layer.eval()  # reads the flag the backward set
    assert count_nonfinite_warnings(records) == 1


# --------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------
def run_steps(layer, data, lr=0.05):
    out = []
    for x, dy in data:
        step = layer_step(layer, x, dy)
        with torch.no_grad():
            layer.weight.sub_(lr * step[2])
            layer.bias.sub_(lr * step[3])
        out.append(step)
    return out


@pytest.mark.parametrize('stop_at', [2, 5, 9, 12])
def test_state_dict_round_trip_continues_bit_for_bit(stop_at):
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(2, C, 4, 4, generator=gen) * (1 + i % 5), torch.randn(2, C, 4, 4,
                                                                             generator=gen))
            for i in range(24)]
    never_stopped = random_affine(MABN(C, **SMALL))
    run_steps(never_stopped, data[:stop_at])
    file = io.BytesIO()
    torch.save(never_stopped.state_dict(), file)
    file.seek(0)
    restored = MABN(C, **SMALL)
    restored.load_state_dict(torch.load(file), strict=True)
    assert int(restored.num_batches_tracked) == stop_at
    for a, b in zip(run_steps(never_stopped, data[stop_at:]), run_steps(restored, data[stop_at:])):
        for u, v in zip(a, b):
            assert torch.equal(u, v)
    for key, value in never_stopped.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    assert int(restored.num_batches_tracked) == 24  # window, warm-up and r all crossed


@pytest.fixture
def log_messages():
    """Messages that reach mmengine's current logger (where print_log(logger=
    'current') writes)."""
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(level=logging.DEBUG)
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def bn_checkpoint(channels=C, steps=5):
    model = torch.nn.Sequential(torch.nn.Conv2d(2, channels, 3), torch.nn.BatchNorm2d(channels))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
        for _ in range(steps):
            model(torch.randn(2, 2, 6, 6))
    return model.state_dict()


def test_load_batchnorm_checkpoint(log_messages):
    torch.manual_seed(0)
    state = bn_checkpoint()
    assert int(state['1.num_batches_tracked']) == 5
    bn_model = torch.nn.Sequential(torch.nn.Conv2d(2, C, 3), torch.nn.BatchNorm2d(C))
    bn_model.load_state_dict(state)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, C, 3), MABN(C, **SMALL))
    with torch.no_grad():  # state the load must replace
        model[1].buffer_x2.fill_(7)
        model[1].num_batches_tracked.fill_(40)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    layer = model[1]
    # the BN's function is kept: weight, bias and second moment from bn_to_mabn
    x = torch.randn(3, 2, 8, 8) * 2 + 1
    torch.testing.assert_close(model.eval()(x), bn_model.eval()(x), rtol=1e-5, atol=1e-5)
    mean, var = state['1.running_mean'].double(), state['1.running_var'].double()
    torch.testing.assert_close(layer.running_var.double(), var + mean.square())
    torch.testing.assert_close(layer.bias.double(), state['1.bias'].double() - state[
        '1.weight'].double() * mean / (var + 1e-5).sqrt())
    assert int(layer.num_batches_tracked) == 0
    assert not layer.buffer_x2.any() and not layer.buffer_gz.any()
    notes = [m for m in log_messages if m.startswith('MABN 1:')]
    assert 'running_mean folded into weight, bias and the second moment' in notes[0]
    assert 'a CenConv in front still changes it' in notes[0]
    assert 'the other MABN layers of this checkpoint likewise' in notes[0]
    model.train()
    # fine-tuning starts in the batch-statistics phase and trains
    y, dx, _, _ = layer_step(layer, torch.randn(2, C, 4, 4), torch.randn(2, C, 4, 4))
    assert torch.isfinite(dx).all() and int(layer.num_batches_tracked) == 1


def test_load_logs_one_line_per_layer_class(log_messages):
    from mmengine.runner.checkpoint import load_state_dict
    model = torch.nn.Sequential(torch.nn.Conv2d(2, C, 3), MABN(C), MABN(C))
    state = bn_checkpoint()
    state.update({'2.' + k[2:]: v.clone() for k, v in state.items() if k.startswith('1.')})
    load_state_dict(model, state, strict=True)
    info = [m for m in log_messages if 'likewise' in m]
    assert len(info) == 1 and info[0].startswith('MABN 1:')


def test_load_batchnorm_checkpoint_with_mmengine_loader(log_messages):
    from mmengine.runner.checkpoint import load_state_dict
    model = torch.nn.Sequential(torch.nn.Conv2d(2, C, 3), MABN(C))
    load_state_dict(model, bn_checkpoint(), strict=True)  # raises on any missing/unexpected key
    assert any('MABN 1: BatchNorm statistics: running_mean folded' in m for m in log_messages)


def test_checkpoint_without_the_layer_reports_missing_keys(log_messages):
    model = torch.nn.Sequential(torch.nn.Conv2d(2, C, 3), MABN(C), MABN(C))
    result = model.load_state_dict(bn_checkpoint(), strict=False)
    assert sorted(result.missing_keys) == sorted(
        f'2.{k}' for k in ('weight', 'bias', 'running_var', 'buffer_x2', 'buffer_gz'))
    # (num_batches_tracked is filled in by BatchNorm's own version-1 compatibility code)
    assert not any(m.startswith('MABN 2') for m in log_messages)


def original_layout(layer):
    """The state dict the original authors' MABN2d writes for the same state."""
    state = layer.state_dict()
    return {
        'weight': state['weight'].clone(),
        'bias': state['bias'].clone(),
        'running_var': state['running_var'].view(1, -1, 1, 1).clone(),
        'iters': state['num_batches_tracked'].view(1).clone(),
        'buffer_x2': state['buffer_x2'].clone(),
        'buffer_gz': state['buffer_gz'].clone(),
    }


def test_load_original_authors_checkpoint(log_messages):
    gen = torch.Generator().manual_seed(5)
    data = [(torch.randn(2, C, 4, 4, generator=gen), torch.randn(2, C, 4, 4, generator=gen))
            for _ in range(20)]
    trained = random_affine(MABN(C, **SMALL))
    run_steps(trained, data[:7])
    original = original_layout(trained)
    assert original['running_var'].shape == (1, C, 1, 1) and original['iters'].shape == (1,)
    loaded = MABN(C, **SMALL)
    result = loaded.load_state_dict(original, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.running_var.shape == (C,) and loaded.num_batches_tracked.shape == ()
    assert any('running_var of shape (1, 3, 1, 1) (original MABN code) reshaped to (3,)' in m
               for m in log_messages), log_messages
    assert any('step counter iters = 7 (original MABN code) loaded as num_batches_tracked' in m
               for m in log_messages), log_messages
    # and it continues exactly like the layer it came from
    for a, b in zip(run_steps(trained, data[7:]), run_steps(loaded, data[7:])):
        for u, v in zip(a, b):
            assert torch.equal(u, v)


def test_own_checkpoint_loads_without_notes(log_messages):
    layer = MABN(C)
    layer.load_state_dict(MABN(C).state_dict(), strict=True)
    assert not any(m.startswith('MABN') for m in log_messages)


# --------------------------------------------------------------------------
# Several calls per step
# --------------------------------------------------------------------------
@pytest.mark.parametrize('before', [0, 9])  # early phase / moving-average phase with r on
def test_two_calls_then_one_backward(before):
    cfg = dict(buffer_size=4, warmup_iters=0, renorm_start_iter=6)
    layer = random_affine(MABN(C, **cfg).double())
    ref = ReferenceMABN(C, **cfg)
    gen = torch.Generator().manual_seed(0)

    def rand(scale=1.0):
        return torch.randn(2, C, 3, 3, generator=gen, dtype=F64) * scale

    for i in range(before):
        x, dy = rand(1 + i % 3), rand()
        layer_step(layer, x, dy)
        ref.backward(ref.forward(x, layer.weight.detach(), layer.bias.detach())[1], dy)
    x1, x2, dy1, dy2 = rand(), rand(3), rand(), rand()
    layer.zero_grad()
    x1r, x2r = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    y1, y2 = layer(x1r), layer(x2r)  # e.g. a head shared by two pyramid levels
    assert int(layer.num_batches_tracked) == before + 2
    ((y1 * dy1).sum() + (y2 * dy2).sum()).backward()

    weight, bias = layer.weight.detach(), layer.bias.detach()
    ry1, s1 = ref.forward(x1, weight, bias)  # t = before + 1
    ry2, s2 = ref.forward(x2, weight, bias)  # t = before + 2
    rdx2, rdw2, rdb2 = ref.backward(s2, dy2)  # autograd runs the later call first
    rdx1, rdw1, rdb1 = ref.backward(s1, dy1)
    torch.testing.assert_close(y1.detach(), ry1)
    torch.testing.assert_close(y2.detach(), ry2)
    torch.testing.assert_close(x1r.grad, rdx1)
    torch.testing.assert_close(x2r.grad, rdx2)
    torch.testing.assert_close(layer.weight.grad, rdw1 + rdw2)
    torch.testing.assert_close(layer.bias.grad, rdb1 + rdb2)
    assert_state(layer, ref)  # two rows of each buffer written, one per call
    rows = [(before + 1) % 4, (before + 2) % 4]
    torch.testing.assert_close(layer.buffer_x2[rows], torch.stack([(x1 ** 2).mean((0, 2, 3)),
                                                                   (x2 ** 2).mean((0, 2, 3))]))


# --------------------------------------------------------------------------
# No host synchronisation in the training step
# --------------------------------------------------------------------------
def _forbidden(name):
    def fail(*args, **kwargs):
        raise AssertionError(f'host read of a tensor value: Tensor.{name}')
    return fail


def test_no_host_read_in_training_step(monkeypatch):
    layer = MABN(C, buffer_size=2, warmup_iters=3, renorm_start_iter=5)
    data = [(torch.randn(2, C, 3, 3), torch.randn(2, C, 3, 3)) for _ in range(8)]
    with monkeypatch.context() as patch:
        for name in ('item', '__bool__', '__int__', '__float__', '__index__', 'tolist', 'numpy'):
            patch.setattr(torch.Tensor, name, _forbidden(name))
        for x, dy in data:  # crosses the window fill, warm-up and the renormalisation start
            x = x.requires_grad_()
            layer(x).backward(dy)
    assert int(layer.num_batches_tracked) == 8


def test_training_step_runs_on_meta_device():
    # Meta tensors have no data: any .item(), bool() or data-dependent indexing,
    # in Python or in C++, raises.
    layer = MABN(C, buffer_size=2, warmup_iters=3, renorm_start_iter=5).to('meta')
    for _ in range(8):
        x = torch.empty(2, C, 3, 3, device='meta', requires_grad=True)
        y = layer(x)
        y.backward(torch.empty_like(y))
        assert x.grad.shape == x.shape and layer.weight.grad.device.type == 'meta'


# --------------------------------------------------------------------------
# MMCV / MMDetection integration
# --------------------------------------------------------------------------
def test_build_norm_layer_names_it_bn():
    cnn = pytest.importorskip('mmcv.cnn')
    name, layer = cnn.build_norm_layer(dict(type='MABN', buffer_size=8, requires_grad=True), 16)
    assert name == 'bn' and isinstance(layer, MABN) and layer.buffer_size == 8


def test_mmdet_resnet_with_mabn_trains_and_predicts():
    pytest.importorskip('mmdet')
    from mmdet.models.backbones import ResNet
    model = ResNet(depth=18, norm_cfg=dict(type='MABN', buffer_size=2), norm_eval=False,
                   frozen_stages=-1)
    model.init_weights()
    model.train()
    for _ in range(3):
        outs = model(torch.randn(1, 3, 64, 64))
        loss = sum(o.float().square().mean() for o in outs)
        loss.backward()
        assert torch.isfinite(loss)
    layers = [m for m in model.modules() if isinstance(m, MABN)]
    assert layers and all(int(m.num_batches_tracked) == 3 for m in layers)
    model.eval()
    with torch.no_grad():
        assert all(torch.isfinite(o).all() for o in model(torch.randn(1, 3, 64, 64)))


def test_inference_runs_batch_norms_kernel_alone():
    # Inference is BatchNorm's kernel with a zero mean: the same ATen calls as
    # nn.BatchNorm2d's inference, nothing around them (the speed of the layer
    # benchmark's eval column comes from this).
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, C, 5, 5)
    layer, bn = MABN(C).eval(), torch.nn.BatchNorm2d(C).eval()
    layer.running_var.uniform_(0.5, 2)
    calls = []
    for module in (layer, bn):
        module(x)  # MABN keeps its zero mean from the first call
        with Calls() as mode:
            mode.names = []
            module(x)
        calls.append(mode.names)
    assert calls[0] == calls[1]
    expected = x * (layer.weight / (layer.running_var + layer.eps).sqrt()).view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected + layer.bias.view(1, -1, 1, 1))


def test_inference_zero_mean_follows_casts_and_moves():
    # The zero mean kept between inference calls is made again whenever the
    # layer's buffer is replaced (.double(), .half(), .to(device)), so every
    # call still computes weight * x / sqrt(running_var + eps) + bias.
    layer = random_affine(MABN(C)).eval()
    layer.running_var.uniform_(0.5, 2)

    def expected(x):
        var = layer.running_var.to(torch.float64)
        scale = layer.weight.to(torch.float64) / (var + layer.eps).sqrt()
        return x.to(torch.float64) * scale.view(1, -1, 1, 1) + layer.bias.to(
            torch.float64).view(1, -1, 1, 1)

    x = torch.randn(2, C, 3, 3)
    for cast, dtype, tol in ((torch.nn.Module.float, torch.float32, 1e-6),
                             (torch.nn.Module.double, torch.float64, 1e-12),
                             (torch.nn.Module.half, torch.float16, 2e-3),
                             (torch.nn.Module.float, torch.float32, 1e-6)):
        cast(layer)
        xi = x.to(dtype)
        for _ in range(2):  # the second call uses the kept zeros
            y = layer(xi)
            assert y.dtype == dtype
            torch.testing.assert_close(y.to(torch.float64), expected(xi), rtol=tol, atol=tol)
        assert layer.__dict__['_zeros'][0] is layer.running_var


@pytest.mark.parametrize('layout', ['torchvision', 'mmdet_detector'])
def test_bn_pretrained_backbone_keeps_its_function_in_mabn(layout, tmp_path):
    # the most common start: a backbone init_cfg pointing at an ImageNet BN
    # ResNet-50, loaded by mmengine into MABN layers (plain convs)
    backbones = pytest.importorskip('mmdet.models.backbones')
    torch.manual_seed(0)
    bn = backbones.ResNet(depth=50, norm_eval=False)
    with torch.no_grad():  # BN statistics and affine parameters of a trained network
        for module in bn.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
    state = bn.state_dict()
    if layout == 'torchvision':  # torchvision's names are the backbone's, plus the classifier
        state = dict(state, **{'fc.weight': torch.zeros(1000, 2048), 'fc.bias': torch.zeros(1000)})
        checkpoint, prefix = dict(state), None
    else:  # a detector checkpoint: the backbone under 'backbone.'
        checkpoint = {'state_dict': {f'backbone.{k}': v for k, v in state.items()}}
        prefix = 'backbone.'
    path = tmp_path / 'bn.pth'
    torch.save(checkpoint, path)
    init_cfg = dict(type='Pretrained', checkpoint=str(path))
    if prefix:
        init_cfg['prefix'] = prefix
    mabn = backbones.ResNet(depth=50, norm_eval=False, norm_cfg=dict(type='MABN'),
                            init_cfg=init_cfg)
    mabn.init_weights()
    x = torch.randn(1, 3, 64, 64)
    bn.eval()
    mabn.eval()
    with torch.no_grad():
        for want, got in zip(bn(x), mabn(x)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
