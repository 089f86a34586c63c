"""CBN: cross-iteration batch normalization (Yao et al., "Cross-Iteration Batch
Normalization", CVPR 2021).

The layer averages the statistics of the last k + 1 training steps (k =
``buffer_num``), after moving each old statistic to the current weight theta_t
of the conv that feeds the layer with a first-order Taylor step (scaled by
``rho``; rho = 0 is the naive average). Per channel, with x the layer's input
(the conv's output), channels on dim 1:

    mu_t = mean(x)            nu_t = mean(x^2)         (attached to the graph)
    mu_tau(theta_t) = mu_tau + rho * <dmu_tau/dtheta, theta_t - theta_tau>
    nu_tau(theta_t) = nu_tau + rho * <dnu_tau/dtheta, theta_t - theta_tau>
    keep_tau        = nu_tau(theta_t) - mu_tau(theta_t)^2 >= 0     (per channel)
    mu     = mean over {t} + kept tau of mu
    sigma2 = max(mean over {t} + kept tau of nu  -  mu^2, 0)
    y      = weight * (x - mu) / sqrt(sigma2 + eps) + bias

Gradients flow through mu_t and nu_t only. running_mean and running_var follow
PyTorch BN (momentum weighs the NEW value, default 0.1; unbiased variance).
During burn-in (``burnin`` iterations, or ``burnin_epochs`` converted by
``CBNBurninHook``) and when the input carries no gradient the layer is plain
BN (reentrant checkpointing's first forward is a step with gradients taken
in two halves, see "Activation checkpointing" in docs/layer_state.md); in
eval mode it is BN with the running statistics.

The feeding conv is read from the input's autograd node (its input and the
weight it convolved with), so ``norm_cfg=dict(type='CBN')`` after an
``nn.Conv2d``, CenConv or WSConv needs no wiring and nothing is hooked; any
other producer raises an error that names the layer (unless rho = 0). The
training step runs outside torch.compile's graphs, see
:func:`mmnorm.surgery.compile.keep_cbn_convs_eager`. State is in
buffers saved with the checkpoint: the step counter ``num_batches_tracked``,
``history_pushes`` and the ring ``history_*`` (empty until the first push), so
a resumed run continues bit-for-bit. Half input gets float32 statistics and
an output of its own dtype; an empty input returns an empty output and changes
no state; a non-finite statistic never enters the buffers. A step makes no
device-to-host synchronisation.

See docs/cbn.md for the derivatives (no ``autograd.grad``), how the conv is
found and its limits, the state and its host mirrors, burn-in windows,
loading a BatchNorm state dict, "DDP" (``sync_stats``), "Averaging buffers"
(SyncBuffersHook, EMAHook) and the measured cost.
"""
import inspect
import math
import warnings
import weakref

import torch
from mmengine.registry import MODELS

from ..._torch import (
    in_reentrant_checkpoint,
    native_batch_norm,
    native_batch_norm_backward,
    version,
    without_autocast,
)
from ..base import SmallBatchNorm, StateChange, check_number
from ..conv_statistics import (
    conv_statistic_derivative_sums,
    conv_statistic_derivatives,
    current_weight,
    feeding_convolution,
    square_derivative_sum,
    weight_source,
)
from ..distributed import all_reduce_sum, union_moments
from ..operators import Eager
from .fused import _HISTORY, _fused_forward, fused_train_step

__all__ = ['CBN']

# -------------------------------------------------------------- normalizing
def _finite(value):
    """``torch.isfinite(value)`` in two operations instead of its four:
    |value| < inf is False exactly for inf and NaN."""
    return value.abs() < math.inf


def pooled_statistics(mu_t, var_t, past_mu, past_var, keep):
    """The window's mean and variance, the pooled form of the module
    docstring: mu = (mu_t + sum of kept past mu) / c and sigma2 = (var_t +
    (mu_t - mu)^2 + sum over kept of (var + (mu_tau - mu)^2)) / c, with c = 1 +
    the number of kept entries. Every term is >= 0 (var_t is, and keep requires
    it of the past variances), so sigma2 needs no clamp. mu_t, var_t (C,);
    past_mu, past_var (k, C), read only where ``keep`` (k, C, bool) is True.
    Returns (mu, sigma2, c), each (C,)."""
    count = keep.sum(0, dtype=mu_t.dtype) + 1
    mu = (mu_t + torch.where(keep, past_mu, 0).sum(0)) / count
    past_dev = past_mu - mu
    spread = torch.where(keep, torch.addcmul(past_var, past_dev, past_dev), 0).sum(0)
    dev = mu_t - mu
    sigma2 = (torch.addcmul(var_t, dev, dev) + spread) / count
    return mu, sigma2, count


class _CrossIterationNorm(torch.autograd.Function):
    """y = weight * (x - mu) / sqrt(sigma2 + eps) + bias with the pooled
    statistics of the module docstring (mu, sigma2); differentiable in x (through mu_t and
    nu_t), weight and bias. Also returns mu_t and var_t (biased), not
    differentiable.

    Inputs past_mu, past_var (k, C) are the compensated past means and variances
    and keep (k, C) bool the entries to pool, or all None.

    Backward, with a = weight / sqrt(sigma2 + eps), xhat = (x - mu) / sqrt(...),
    c the per-channel count: dx = a * (g - mean(g) / c - xhat * mean(g xhat) / c),
    evaluated as PyTorch's batch-norm backward kernel with (mu, invstd) and
    weight / c, plus (weight - weight / c) / sqrt(sigma2 + eps) * g.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, past_mu, past_var, keep, eps):
        with without_autocast(x.device.type):
            dtype = SmallBatchNorm.stats_dtype(x)
            weight_c, bias_c = weight.to(dtype), bias.to(dtype)
            # PyTorch's batch-norm kernel: the batch statistics (two-pass, in
            # float32 for half input) and, with no past, the output, as BN.
            y, mu_t, invstd = native_batch_norm(x, weight_c, bias_c, None, None,
                                                               True, 0.0, eps)
            var_t = (invstd.pow(-2) - eps).clamp_min(0)
            mu, count = mu_t, None
            if keep is not None:
                mu, sigma2, count = pooled_statistics(mu_t, var_t, past_mu, past_var, keep)
                y = torch.batch_norm(x, weight_c, bias_c, mu, sigma2, False, 0.0, eps,
                                     torch.backends.cudnn.enabled)
                invstd = (sigma2 + eps).rsqrt()
        ctx.save_for_backward(x, weight_c, mu, invstd, count)
        ctx.eps = eps
        ctx.weight_dtype, ctx.bias_dtype = weight.dtype, bias.dtype
        ctx.mark_non_differentiable(mu_t, var_t)
        ctx.set_materialize_grads(False)  # no zero gradients for mu_t, var_t
        return y, mu_t, var_t

    @staticmethod
    def backward(ctx, grad_y, _grad_mu, _grad_var):
        x, weight, mu, invstd, count = ctx.saved_tensors
        with without_autocast(x.device.type):
            # In the statistics dtype: a half-precision kernel path gave NaN input
            # gradients on CUDA for float16 activations of 1e3 to 1e4 (GPU check).
            xs, gy = x.to(weight.dtype), grad_y.to(weight.dtype)
            scaled = weight if count is None else weight / count
            grad_x, grad_weight, grad_bias = native_batch_norm_backward(
                gy, xs, scaled, None, None, mu, invstd, True, ctx.eps, [True, True, True])
            if count is not None:
                shape = (1, -1) + (1,) * (x.dim() - 2)
                grad_x = grad_x.addcmul_(gy, ((weight - scaled) * invstd).view(shape))
        return (grad_x.to(x.dtype), grad_weight.to(ctx.weight_dtype),
                grad_bias.to(ctx.bias_dtype), None, None, None, None)


# ----------------------------------------------------------------------- CBN
def _history_buffer(key, shape, float_dtype, device=None):
    """Zeros for the ring buffer ``key``: int64 for ``history_valid`` (see
    "Averaging buffers" in docs/cbn.md), ``float_dtype`` otherwise."""
    dtype = torch.long if key == 'history_valid' else float_dtype
    return torch.zeros(shape, dtype=dtype, device=device)


@MODELS.register_module()
class CBN(SmallBatchNorm):
    """Cross-iteration batch normalization (see the module docstring).

    Args:
        num_features (int): C, channels on dim 1 (the feeding conv's out_channels).
        eps (float): added to the variance under the root. Default 1e-5.
        momentum (float): weight of the NEW batch value in the running
            statistics (PyTorch BN's convention). Default 0.1.
        buffer_num (int): k >= 1, past steps kept; the window is k + 1 steps.
            Default 3.
        rho (float): >= 0, scale of the Taylor compensation; 0 is the naive
            cross-iteration average and needs no conv. Default 1.0.
        burnin (int): burn-in in iterations (this layer's training steps).
            Default 0.
        two_stage (bool): window jumps from 0 to k after burn-in (True) or grows
            as int(k * min(t / burnin, 1)) (False). Default True.
        burnin_epochs (float | None): burn-in in epochs instead of ``burnin``;
            needs :class:`mmnorm.engine.cbn_burnin_hook.CBNBurninHook` (or
            :meth:`set_iters_per_epoch`) before the first training step.
        sync_stats (bool): use the statistics of all processes' inputs (see
            "DDP" in docs/cbn.md). Default False: each process keeps
            its own, as in the paper.
    """

    FUSED_STEP = True
    STATISTIC_BUFFERS = ('running_mean', 'running_var') + tuple(
        key for key in _HISTORY if key != 'history_valid')

    def __init__(self, num_features, eps=1e-5, momentum=0.1, buffer_num=3, rho=1.0, burnin=0,
                 two_stage=True, burnin_epochs=None, sync_stats=False):
        super().__init__(num_features, eps, momentum, sync_stats)
        name = type(self).__name__
        self.buffer_num = check_number(name, 'buffer_num', buffer_num, integer=True, minimum=1,
                                       exclusive=False)
        self.rho = check_number(name, 'rho', rho, minimum=0, exclusive=False)
        self.burnin = check_number(name, 'burnin', burnin, integer=True, minimum=0,
                                   exclusive=False)
        if not isinstance(two_stage, bool):
            raise TypeError(f'{name}: two_stage must be a bool, got {two_stage!r}')
        self.two_stage = two_stage
        if burnin_epochs is not None:
            check_number(name, 'burnin_epochs', burnin_epochs, minimum=0, exclusive=False)
            if burnin != 0:
                raise ValueError(f'{name}: state burn-in either in iterations (burnin={burnin!r}) '
                                 f'or in epochs (burnin_epochs={burnin_epochs!r}), not both')
        self.burnin_epochs = burnin_epochs
        self._burnin_from_epochs = None
        for key in _HISTORY:
            self.register_buffer(key, _history_buffer(key, 0, torch.float32))
        self.register_buffer('history_pushes', torch.tensor(0, dtype=torch.long))
        self._host = {}
        self._last_conv_weight = None
        self._weight_source = None  # weakref: gives theta again without autograd
        self._recomputed_later = False  # this step's push waits for its recompute
        self._warned_uncompensated = False
        _TRAIN_STEP.prepare()
        _REPLAY.prepare()

    @classmethod
    def needs_feeding_conv(cls, cfg):
        return cfg.get('rho', inspect.signature(cls).parameters['rho'].default) != 0

    # ------------------------------------------------------------ pickling
    def __getstate__(self):
        state = super().__getstate__()
        state['_host'] = {}
        state['_last_conv_weight'] = None
        state['_weight_source'] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault('_warned_uncompensated', False)
        _TRAIN_STEP.prepare()  # a layer unpickled in a fresh process
        _REPLAY.prepare()

    def train(self, mode=True):
        self._host = {}  # re-read the counters: they may have been written through .data
        return super().train(mode)

    @property
    def last_conv_weight(self):
        """theta of the last training forward: the weight tensor the feeding
        conv convolved with (its parameter, or its transformed weight), while
        it is alive; held weakly, for inspection only."""
        return None if self._last_conv_weight is None else self._last_conv_weight()

    # ------------------------------------------------------------- burn-in
    def set_iters_per_epoch(self, iters_per_epoch):
        """Convert ``burnin_epochs`` with the run's iterations per epoch:
        burnin = round(burnin_epochs * iters_per_epoch). Returns the burn-in in
        iterations, or None if this layer states it in iterations."""
        check_number(type(self).__name__, 'iters_per_epoch', iters_per_epoch, integer=True,
                     minimum=0)
        if self.burnin_epochs is None:
            return None
        self._burnin_from_epochs = round(self.burnin_epochs * iters_per_epoch)
        return self._burnin_from_epochs

    def burnin_iters(self):
        """The burn-in in iterations; raises if stated in unconverted epochs."""
        if self.burnin_epochs is None:
            return self.burnin
        if self._burnin_from_epochs is None:
            layer = self.describe()
            raise RuntimeError(
                f'{layer}: burnin_epochs={self.burnin_epochs} is stated in epochs, but nothing '
                'converted it to iterations. Add custom_hooks=[dict(type=\'CBNBurninHook\')] '
                'to the config (it reads len(train_dataloader)), call '
                'layer.set_iters_per_epoch(n), or state burnin= in iterations.')
        return self._burnin_from_epochs

    def window_size(self, t, burnin=None):
        """w(t): how many past steps step t averages (0 = plain BN, no push)."""
        k = self.buffer_num
        burnin = self.burnin_iters() if burnin is None else burnin
        if burnin == 0:
            return k
        if self.two_stage:
            return k if t > burnin else 0
        return int(k * min(t / burnin, 1.0))

    # ------------------------------------------------------ host mirrors
    def _host_count(self, name):
        buffer = getattr(self, name)
        cached = self._host.get(name)
        if cached is not None and cached[0]() is buffer and cached[1] == version(buffer):
            return cached[2]
        value = int(buffer)
        self._host[name] = (weakref.ref(buffer), version(buffer), value)
        return value

    def _advance_step(self):
        self._increment('num_batches_tracked')

    def _increment(self, name):
        value = self._host_count(name) + 1
        getattr(self, name).add_(1)
        self._host_knows(name, value)
        return value

    def _host_knows(self, name, value):
        """Record that the counter ``name`` now holds ``value`` (written on the
        device by this layer)."""
        buffer = getattr(self, name)
        self._host[name] = (weakref.ref(buffer), version(buffer), value)

    # ------------------------------------------------------------ binding
    def _feeding_conv(self, x):
        """(ConvCall, conv input, theta) of the conv that produced ``x``, or
        raise naming the layer."""
        found = feeding_convolution(x)
        if isinstance(found, str):
            raise RuntimeError(
                f'{self.describe()}: {found}. CBN with rho={self.rho} compensates the '
                'statistics with the weight of the conv that directly feeds it; place it right '
                'after a conv (conv -> CBN -> activation), or set rho=0 for the uncompensated '
                'cross-iteration average.')
        call, conv_input, weight = found
        self._last_conv_weight = weakref.ref(weight)
        return call, conv_input, weight

    # ------------------------------------------------------------ history
    def _history_dtype(self):
        return torch.promote_types(self.running_mean.dtype, torch.float32)

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``, ... with the ring's shapes and layout kept.

        After the first push, history_dmean is rank 4 and history_dsqmean and
        history_weight rank 5. ``Module.to(memory_format=...)`` gives every
        rank-4/5 tensor that format: channels_last raises on rank 5,
        channels_last_3d on rank 4, and a permuted layout would break the
        fused kernels, which read these buffers as contiguous rows. So ``fn``
        sees them as contiguous rank-3 (k, C, F) views, and they get their
        shapes back after (the state dict keeps its rank-4/5 shapes)."""
        flat = {}
        for key in _HISTORY:
            buffer = self._buffers.get(key)
            if buffer is not None and buffer.dim() > 3:
                flat[key] = (buffer, buffer.reshape(buffer.shape[0], buffer.shape[1], -1))
                self._buffers[key] = flat[key][1]
        try:
            return super()._apply(fn, recurse)  # statistics stay >= float32 there
        finally:
            for key, (old, view) in flat.items():
                new = self._buffers[key]
                self._buffers[key] = old if new is view else new.reshape(old.shape)

    def _ensure_history(self, shapes):
        """Allocate the ring with ``shapes`` (name -> shape without k) or check
        that it has them."""
        k = self.buffer_num
        for key, shape in shapes.items():
            want = (k,) + tuple(shape)
            have = getattr(self, key)
            if tuple(have.shape) == want:
                continue
            if have.numel() > 0 and self._host_count('history_pushes') > 0:
                layer = self.describe()
                raise RuntimeError(
                    f'{layer}: the stored history {key} has shape {tuple(have.shape)}, but this '
                    f'step needs {want}; the conv that feeds the layer changed shape (or '
                    'buffer_num changed)')
            self._shape_history(key, want)

    def _shape_history(self, key, shape):
        """Zeros of ``shape`` as the ring buffer ``key``, in the history's dtype."""
        setattr(self, key, _history_buffer(key, shape, self._history_dtype(),
                                           self.running_mean.device))

    def _ages(self, device):
        """Age of every ring slot in steps (0 = newest), as a (k,) tensor:
        (pushes - 1 - slot) mod k."""
        pushes = self._host_count('history_pushes')
        k = self.buffer_num
        return torch.arange(pushes - 1, pushes - 1 - k, -1, device=device) % k

    def past_statistics(self, weight=None, window=None, dtype=None):
        """The stored steps moved to ``weight`` (theta_t; None: uncompensated).

        Returns (mu, nu, keep, ages), each with k rows in ring order: the
        compensated means and second moments (k, C), the keep mask (k, C)
        (in the newest ``window`` steps, finite when stored, compensated
        variance >= 0) and each row's age (0 = newest). None if nothing is
        stored.
        """
        past = self._past(weight, window, dtype)
        if past is None:
            return None
        mu, nu, _, keep = past
        return mu, nu, keep, self._ages(mu.device)

    def _past(self, weight, window, dtype):
        """(mu, nu, var, keep) as :meth:`past_statistics` gives them, with the
        compensated variances var = nu - mu^2 (k, C) instead of the ages.

        All k stored steps at once. With F = C_in/groups * kh * kw, delta
        (k, C, F) the rows of theta_t - theta_tau (the only temporary of k
        times the weight's size) and g(c) the group of channel c:

            mu_tau(theta_t)[c] = mu_tau[c] + rho * <delta_tau[c], dmu_tau[g(c)]>
            nu_tau(theta_t)[c] = nu_tau[c] + rho * <delta_tau[c], dnu_tau[c]>

        dmu_tau[g] (F,) is group g's part of the compact mean derivative, so the
        mean shifts are one batched (1, F) x (F, C/groups) product per step and
        group; the second-moment shifts are row-wise dot products.
        """
        pushes = self._host_count('history_pushes')
        if pushes == 0 or self.history_mean.numel() == 0:
            return None
        k = self.buffer_num
        window = k if window is None else window
        dtype = dtype or self._history_dtype()
        mu = self.history_mean.to(dtype)
        nu = self.history_sqmean.to(dtype)
        if weight is not None and self.rho != 0:
            channels = weight.shape[0]
            groups = self.history_dmean.shape[1] // self.history_weight.shape[2]
            # Contiguous: a channels_last weight would give a delta that .view cannot flatten.
            theta = weight.to(dtype).contiguous()
            delta = (theta - self.history_weight.to(dtype)).view(k, channels, -1)
            dmu = self.history_dmean.to(dtype).reshape(k * groups, 1, -1)
            group_rows = delta.view(k * groups, channels // groups, -1).transpose(1, 2)
            mu = torch.baddbmm(mu.view(k * groups, 1, -1), dmu, group_rows,
                               alpha=self.rho).view(k, channels)
            # In place: delta is not needed any more (and a second k x weight
            # temporary costs more than the product on the CPU).
            dnu = self.history_dsqmean.to(dtype).view(k, channels, -1)
            nu = nu.add(delta.mul_(dnu).sum(2), alpha=self.rho)
        var = nu - mu.square()
        keep = (self.history_valid == 1) & (var >= 0)
        used = min(window, pushes, k)
        if used < k:  # the oldest slots are outside the window (otherwise all are in)
            keep &= (self._ages(mu.device) < used)[:, None]
        return mu, nu, var, keep

    # ------------------------------------------------------------ forward
    def _train_forward(self, x, sync):
        # Eager even in a compiled model: the conv is read from x's autograd node.
        return _TRAIN_STEP(self, x, sync)

    def _check_step(self, x, sync):
        self.burnin_iters()
        self._recomputed_later = (not (torch.is_grad_enabled() and x.requires_grad)
                                  and in_reentrant_checkpoint())
        if self._recomputed_later:
            # No conv node to read now: the step is taken on the ATen path,
            # its push in the recompute (_push_later).
            self._fused_now = False
            return
        if self._compensates(x):
            self._feeding_conv(x)
        super()._check_step(x, sync)

    def fused_variant(self, x):
        t = self._host_count('num_batches_tracked') + 1  # this step's
        push = torch.is_grad_enabled() and x.requires_grad and self.window_size(t) > 0
        return super().fused_variant(x) + (push, push and self.rho != 0)

    def copy_for_trial(self):
        twin = super().copy_for_trial()
        for name in list(self._host):  # the counters known on the host stay known
            twin._host_knows(name, self._host_count(name))
        return twin

    def _compensates(self, x):
        """True when the step on ``x`` moves past statistics with the feeding
        conv's weight (rho != 0 and a gradient is taken)."""
        return self.rho != 0 and torch.is_grad_enabled() and x.requires_grad

    def _train_step(self, x, sync):
        burnin = self.burnin_iters()
        later = self._recomputed_later  # a step with gradients whose conv is read later
        conv = conv_input = theta = None
        if self._compensates(x):
            conv, conv_input, theta = self._feeding_conv(x)
        t = self._host_count('num_batches_tracked')
        window = (self.window_size(t, burnin)
                  if later or (torch.is_grad_enabled() and x.requires_grad) else 0)
        dtype = self.stats_dtype(x)
        if self._fused_now:
            return self._fused_step(x, window, conv, conv_input, theta, dtype)

        pooled = (None, None, None)  # the past means and variances to pool, and keep
        if window > 0:
            if later and self.rho != 0:
                theta = self._theta_without_autograd()
            with torch.no_grad():
                past = self._past(theta, window, dtype)
            if past is not None:
                mu, _, var, keep = past
                pooled = (mu, var, keep)
                if later and self.rho != 0 and theta is None:
                    self._warn_uncompensated()
        union_count = None
        if sync:
            y, mu_t, var_t, union_count = self._union_normalize(x, dtype, *pooled)
        else:
            y, mu_t, var_t = _CrossIterationNorm.apply(x, self.weight, self.bias, *pooled,
                                                       self.eps)
        push_later = None  # the push that waits for the recompute
        with torch.no_grad():
            finite = _finite(mu_t) & _finite(var_t)
            finite = self.warn_if_nonfinite(finite)
            if sync:
                finite = finite & (union_count > 0)
            if window > 0 and later and self.rho != 0:
                push_later = (mu_t, var_t, finite, union_count)
            elif window > 0:
                self._push(x, mu_t, var_t, finite, conv, conv_input, theta, dtype, union_count)
            self._update_running(x, mu_t, var_t, finite, union_count)
        if sync:
            self._keep_for_replay(x, ('sync', push_later, pooled, (mu_t, var_t, union_count)))
        else:
            self._keep_for_replay(x, ('aten', push_later, pooled))
        return y

    # ---------------------------------------- reentrant checkpointing
    def _theta_without_autograd(self):
        """theta_t from the conv learnt in an earlier recompute
        (:func:`weight_source`), or None before the first one."""
        source = None if self._weight_source is None else self._weight_source()
        return None if source is None else current_weight(source)

    def _learn_weight_source(self, theta):
        """Remember :func:`weight_source` of ``theta``. A parameter is
        remembered at once; a transformed weight costs a scan of the process's
        objects, so its conv (or that there is none, ``_NO_WEIGHT_SOURCE``) is
        looked up once, again only if that conv is gone or was a parameter."""
        known = self._weight_source
        if theta.is_leaf:
            self._weight_source = weakref.ref(theta)
            return
        source = None if known is None else known()
        if isinstance(source, torch.nn.Module) or known is _NO_WEIGHT_SOURCE:
            return
        found = weight_source(theta)
        self._weight_source = weakref.ref(found) if found is not None else _NO_WEIGHT_SOURCE

    def _push_later(self, x, push_later):
        """The push of a step taken in reentrant checkpointing's first
        forward, made in its recompute: ``x`` is the same conv output, now
        with the conv's node, so the derivatives are those of the step."""
        mu_t, var_t, finite, union_count = push_later
        conv, conv_input, theta = self._feeding_conv(x)
        self._learn_weight_source(theta)
        with torch.no_grad():
            self._push(x, mu_t, var_t, finite, conv, conv_input, theta, self.stats_dtype(x),
                       union_count)

    def _warn_uncompensated(self):
        if self._warned_uncompensated:
            return
        self._warned_uncompensated = True
        warnings.warn(
            f'{self.describe()}: a step in the first forward of reentrant activation '
            'checkpointing (use_reentrant=True, MMDetection\'s with_cp) pooled its past '
            'statistics without the Taylor compensation: that forward runs without autograd, '
            'and the conv that feeds the layer is learnt in the first recompute, which this '
            'process has not run yet (the first step after a resume). The steps after it are '
            'exact (docs/layer_state.md, "Activation checkpointing")', RuntimeWarning,
            stacklevel=2)

    def _fused_step(self, x, window, conv, conv_input, theta, dtype):
        """The training step on the fused kernels (see :func:`fused_train_step`):
        the same numbers as the ATen path; the push counter is read and
        written on the device only."""
        push = window > 0
        compensate = push and self.rho != 0
        if push:
            self._ensure_history(self._history_shapes(conv, conv_input, theta))
        # POOL: the ring exists (with no push yet, no slot is in the window)
        pool = push and self.history_mean.dim() == 2
        square_sum = call = None
        if not compensate:
            theta = conv_input = None
        else:
            with torch.no_grad():
                square_sum = square_derivative_sum(conv, conv_input, x, dtype, theta)
            # Rows of F = C_in / groups * kh * kw numbers per output channel.
            theta, square_sum = theta.contiguous(), square_sum.contiguous()
            call = [*conv.stride, *conv.padding, *conv.dilation, *conv.kernel_size]
        y, saved = fused_train_step(x, self.weight, self.bias, self.running_mean,
                                    self.running_var, self.history_pushes, self.step_flags,
                                    *(getattr(self, key) for key in _HISTORY), theta, conv_input,
                                    square_sum, call, conv.groups if compensate else 1, window,
                                    self.eps, self.momentum, self.rho, pool, push)
        if push:
            self._host.pop('history_pushes', None)  # advanced on the device
        self._keep_for_replay(x, ('fused', None, saved))
        return y

    def _replay(self, x, record):
        return _REPLAY(self, x, record)

    def _replay_step(self, x, record):
        kind, push_later, *rest = record
        if kind == 'fused':  # x, weight and bias: what the fused backward keeps
            unused = (None,) * (len(inspect.signature(_fused_forward).parameters) - 3)
            return fused_train_step(x, self.weight, self.bias, *unused, former=rest[0])[0]
        if kind == 'sync':
            pooled, moments = rest
            y = self._union_normalize(x, self.stats_dtype(x), *pooled, former=moments)[0]
        else:
            y = _CrossIterationNorm.apply(x, self.weight, self.bias, *rest[0], self.eps)[0]
        if push_later is not None:
            self._push_later(x, push_later)
        return y

    def _history_shapes(self, conv, conv_input, theta):
        """The ring's shapes (name -> shape without k) for a push."""
        shapes = {'history_mean': (self.num_features,), 'history_sqmean': (self.num_features,),
                  'history_valid': (self.num_features,)}
        if self.rho != 0:
            shapes.update(history_dmean=(conv_input.size(1), *conv.kernel_size),
                          history_dsqmean=theta.shape, history_weight=theta.shape)
        return shapes

    def _union_normalize(self, x, dtype, past_mu, past_var, keep, former=None):
        """The output for ``sync_stats``: mu_t and var_t are the union's
        (:func:`mmnorm.layers.distributed.union_moments`), pooled with the kept past
        entries (or None) as in :class:`_CrossIterationNorm`, whose equations this
        writes with autograd ops so that the gradient reaches every process's
        input through mu_t and var_t. Returns (y, mu_t, var_t, union count), the
        statistics detached. ``former``: a kept step's (mu_t, var_t, count),
        replayed without all-gathering again."""
        xs = x.to(dtype)
        mu_t, var_t, count = union_moments(xs, former)
        mu, sigma2 = mu_t, var_t
        if keep is not None:
            mu, sigma2, _ = pooled_statistics(mu_t, var_t, past_mu, past_var, keep)
        shape = self.channel_shape(xs)
        scale = self.weight.to(dtype) * (sigma2 + self.eps).rsqrt()
        y = (xs - mu.view(shape)) * scale.view(shape) + self.bias.to(dtype).view(shape)
        return y.to(x.dtype), mu_t.detach(), var_t.detach(), count

    @staticmethod
    def _union_derivatives(conv, conv_input, x, dtype, theta, union_count):
        """dmu/dtheta and dnu/dtheta of the union: the derivative sums of all
        processes (one all-reduce) over the union's element count."""
        patch_sum, weight_grad = conv_statistic_derivative_sums(conv, conv_input, x, dtype, theta)
        sums = all_reduce_sum(torch.cat([patch_sum.flatten(), weight_grad.flatten()]))
        scale = union_count.clamp_min(1)
        split = patch_sum.numel()
        return (sums[:split].view_as(patch_sum) / scale,
                sums[split:].view_as(weight_grad) * (2 / scale))

    def _push(self, x, mu_t, var_t, finite, conv, conv_input, theta, dtype, union_count=None):
        if self.rho != 0:
            if union_count is None:
                dmu, dnu = conv_statistic_derivatives(conv, conv_input, x, dtype, theta)
            else:
                dmu, dnu = self._union_derivatives(conv, conv_input, x, dtype, theta,
                                                   union_count)
        self._ensure_history(self._history_shapes(conv, conv_input, theta))
        slot = self._host_count('history_pushes') % self.buffer_num
        valid = finite
        if self.rho != 0:
            # A channel's entry is valid if all its numbers are finite. A sum is
            # finite only if every summand is (an overflowing sum also counts as
            # not finite), so one sum per channel checks its dnu row, its theta
            # row and its group's dmu. Non-finite numbers are stored as 0, one
            # pass each.
            groups = conv.groups
            sums = (dnu.sum((1, 2, 3)) + theta.sum((1, 2, 3))).view(groups, -1)
            sums = sums + dmu.reshape(groups, -1).sum(1, keepdim=True)
            valid = valid & _finite(sums.flatten())
            for key, value in (('history_dmean', dmu), ('history_dsqmean', dnu),
                               ('history_weight', theta)):
                target = getattr(self, key)[slot]
                torch.nan_to_num(value.to(target.dtype), 0.0, 0.0, 0.0, out=target)
        zero = mu_t.new_zeros(())  # where(..., out=) takes no Python number
        torch.where(valid, mu_t, zero, out=self.history_mean[slot])
        torch.where(valid, torch.addcmul(var_t, mu_t, mu_t), zero, out=self.history_sqmean[slot])
        self.history_valid[slot] = valid
        self._increment('history_pushes')

    def _update_running(self, x, mu_t, var_t, finite, union_count=None):
        """BN's running-statistic update from this step's mu_t and biased var_t
        (C,); the unbiased variance uses x's count, or ``union_count`` (0-dim
        tensor, sync_stats), where running_var changes only if it is > 1."""
        self._move_running(self.running_mean, mu_t, finite)
        if union_count is not None:
            unbias = union_count / (union_count - 1).clamp_min(1)
            self._move_running(self.running_var, var_t * unbias, finite & (union_count > 1))
            return
        count = x.numel() // x.size(1)
        if count > 1:
            self._move_running(self.running_var, var_t * (count / (count - 1)), finite)

    def _move_running(self, buffer, value, finite):
        """buffer <- (1 - m) * buffer + m * value (m = momentum, one lerp) in
        the channels where ``finite``."""
        self.update_where_finite(buffer, buffer.lerp(value.to(buffer.dtype), self.momentum),
                                 finite)

    # --------------------------------------------------------- state dict
    def convert_state(self, state_dict, prefix):
        """A BatchNorm layout (no history keys): start with an empty history
        and restart the step counter, logged (one :class:`StateChange`). Then
        shape the ring buffers like the incoming ones, so that a fresh layer
        can load a trained one."""
        changes = []
        history = _HISTORY + ('history_pushes',)
        if (not any(prefix + key in state_dict for key in history)
                and prefix + 'running_mean' in state_dict):
            for key in _HISTORY:
                state_dict[prefix + key] = _history_buffer(key, 0, torch.float32)
            state_dict[prefix + 'history_pushes'] = torch.tensor(0, dtype=torch.long)
            note = 'BatchNorm layout: no cross-iteration history, it starts empty'
            counter = state_dict.get(prefix + 'num_batches_tracked')
            if counter is not None:
                state_dict[prefix + 'num_batches_tracked'] = torch.zeros_like(counter)
                note += (f'; the step counter num_batches_tracked ({int(counter)} BN steps) '
                         'restarts at 0 so that burn-in runs in full')
            changes.append(StateChange(note, added=history, changed=() if counter is None
                                       else ('num_batches_tracked',)))
        for key in _HISTORY:
            incoming = state_dict.get(prefix + key)
            if isinstance(incoming, torch.Tensor) and incoming.shape != getattr(self, key).shape:
                self._shape_history(key, incoming.shape)
        return changes



def _NO_WEIGHT_SOURCE():
    """The weak reference of a conv whose weight cannot be had again
    without autograd (a weight transform mmnorm does not know)."""
    return None


def _train_step(layer, x, sync):
    # Statistics, derivatives and compensation in the statistics dtype, never
    # in autocast's lower precision; the output keeps the input's dtype.
    with without_autocast(x.device.type):
        return layer._train_step(x, sync)


_TRAIN_STEP = Eager(_train_step)


def _replay_step(layer, x, record):
    with without_autocast(x.device.type):
        return layer._replay_step(x, record)


_REPLAY = Eager(_replay_step)
