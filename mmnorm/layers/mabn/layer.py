"""MABN: moving-average batch normalization (Yan et al., "Towards Stabilizing
Batch Statistics in Backward Propagation of Batch Normalization", ICLR 2020).

With tiny batches the statistics BN uses in the backward pass are as noisy as
the forward ones. MABN normalises the second moment only (no mean subtraction;
a ``CenConv`` in front keeps activations roughly zero-mean) and replaces both
the forward and the backward statistic by a simple moving average (SMA) over
the last m steps. Per channel, x of shape (N, C, *) reduced over every dim but
1, t = ``num_batches_tracked`` (incremented before each training call, so the
first call has t = 1), m = ``buffer_size``, ``early`` = "t <= m or t <
warmup_iters":

forward::

    chi2_t = mean(x^2)                       buffer_x2[t mod m] <- chi2_t
    v_t    = chi2_t if early else mean of the m rows of buffer_x2
    z      = x / sqrt(v_t + eps)
    r      = 1 while t <= max(renorm_start_iter, warmup_iters), afterwards
             clip(sqrt(v_t + eps) / sqrt(running_var + eps), 1/rmax, rmax)
             (running_var from before this step; r is a constant for autograd)
    y      = weight * (r * z) + bias
    running_var <- momentum * running_var + (1 - momentum) * v_t

backward (:data:`train_step`), dy the incoming gradient::

    g      = dy * weight * r                 psi_t = mean(g * z)
    buffer_gz[t mod m] <- psi_t
    psi    = psi_t if early else mean of the m rows of buffer_gz
    dx     = (g - z * psi) / sqrt(v_t + eps)
    dweight = sum(dy * r * z)                dbias = sum(dy)

inference: ``y = weight * x / sqrt(running_var + eps) + bias``. ``momentum``
weighs the OLD value (the reverse of PyTorch BN's convention).

Half input gets float32 statistics (float64 stays float64); a non-finite
statistic never enters the buffers; a step never waits for the device; an
empty input changes no state. ``sync_stats=True`` uses all processes' inputs.
See docs/mabn.md for these guarantees in detail and for DDP.
"""
from typing import Tuple

import torch
from mmengine.registry import MODELS

from ..._torch import (
    any_autocast_enabled,
    autocast_output_dtype,
    autocast_state,
    compiling,
    native_batch_norm_backward,
    without_autocast,
)
from ..base import SmallBatchNorm, StateChange, check_number, note_nonfinite
from ..distributed import union_mean
from ..operators import Operator, with_backward
from .fused import _train_output, fused_train_step

BN_EPS = 1e-5  # BatchNorm's eps where a checkpoint does not say (PyTorch's default)


def bn_to_mabn(weight, bias, mean, var, bn_eps, mabn_eps):
    """BatchNorm's inference statistics, as MABN's.

    BatchNorm at inference is ``weight * (x - mean) / sqrt(var + bn_eps) +
    bias``; MABN's is ``weight' * x / sqrt(running_var' + mabn_eps) + bias'``
    with ``running_var'`` the running second moment. With, per channel,

        running_var' = var + mean^2
        weight'      = weight * sqrt(running_var' + mabn_eps) / sqrt(var + bn_eps)
        bias'        = bias - weight * mean / sqrt(var + bn_eps)

    the two are the same function of x. All arguments are (C,) tensors except
    the two eps; computed in float64, returned as (weight', bias',
    running_var') in the dtypes of weight, bias and var.
    """
    w, b, m, v = (t.double() for t in (weight, bias, mean, var))
    second_moment = v + m.square()
    bn_std = (v + bn_eps).sqrt()
    return ((w * (second_moment + mabn_eps).sqrt() / bn_std).to(weight.dtype),
            (b - w * m / bn_std).to(bias.dtype),
            second_moment.to(var.dtype))


def scaled_grad_and_sums(dy, x, scale, need_scaled):
    """For ``dy`` and ``x`` of shape (N, C, *) (same dtype) and a (C,) ``scale``:
    ``(dy * scale, sum(dy * x), sum(dy))``, sums per channel over every dim but
    1, the first only when ``need_scaled`` (else None).

    This is exactly what BatchNorm's inference-mode backward computes for an
    input with running mean 0, running variance 1 and eps 0 (inverse std 1):
    grad_input = dy * weight, grad_weight = sum(dy * x), grad_bias = sum(dy).
    Its kernel produces all three in one pass over ``dy`` and ``x``, where
    separate ops need three or four (and an (N, C, *) temporary for dy * x).
    """
    zeros, ones = scale.new_zeros(scale.shape), scale.new_ones(scale.shape)
    # The saved statistics repeat the running ones: CUDA's channels_last kernel
    # requires them defined even in inference mode.
    return native_batch_norm_backward(dy, x, scale, zeros, ones, zeros, ones, False, 0.0,
                                      [need_scaled, True, True])


def window_statistic(buffer, row, early, value, flags, present=None):
    """Write the (C,) batch statistic ``value`` into ``buffer[row]`` where it
    is finite (elsewhere the row keeps its value and ``flags`` records it),
    and return the statistic of this step: ``value`` if ``early``, else the
    mean of the m rows. ``row`` is a 1-element index tensor and ``early`` a
    0-dim bool tensor, so nothing here reads a tensor on the host. ``present``
    (0-dim bool, sync_stats only): False when the union of the processes'
    inputs is empty, and then nothing is written."""
    finite = note_nonfinite(flags, torch.isfinite(value))
    rows = torch.arange(buffer.size(0), device=buffer.device) == row
    if present is not None:
        rows = rows & present
    SmallBatchNorm.update_where_finite(buffer, value, rows.unsqueeze(1) & finite)
    return torch.where(early, value, buffer.to(value.dtype).mean(0))


def _train_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    inv_std: torch.Tensor, r: torch.Tensor, buffer_gz: torch.Tensor,
                    row: torch.Tensor, early: torch.Tensor, bias_dtype: torch.dtype,
                    flags: torch.Tensor, sync: bool,
                    need_dx: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) of :func:`_train_output`, writing psi_t into
    ``buffer_gz[row]`` (see :data:`train_step`); dx is empty unless ``need_dx``."""
    cdtype = inv_std.dtype
    with without_autocast(dy.device.type):
        xs, dys = x.to(cdtype), dy.to(cdtype)
        count = xs.numel() // xs.size(1)
        gain = weight.to(cdtype) * r  # g = dy * gain
        coef = gain * inv_std  # dx = dy * coef - x * (psi * inv_std^2)
        if count > 0:
            dx, dot, dy_sum = scaled_grad_and_sums(dys, xs, coef, need_dx)  # dot = sum(dy * x)
        else:  # an empty input on one process under sync_stats
            dx = torch.zeros_like(xs)
            dot, dy_sum = torch.zeros_like(coef), torch.zeros_like(coef)
        present = None
        if sync:  # every process gets here in the same order, see MABN "Processes"
            dot_mean, total = union_mean(dot, count)
            psi_t, present = coef * dot_mean, total > 0
        else:
            psi_t = coef * dot / count  # mean(g * z)
        psi = window_statistic(buffer_gz, row, early, psi_t, flags, present)
        if need_dx:
            shape = SmallBatchNorm.channel_shape(xs)
            dx = dx.addcmul_(xs, (psi * inv_std.square()).view(shape), value=-1).to(x.dtype)
        else:
            dx = x.new_empty(0)
        return dx, (r * inv_std * dot).to(weight.dtype), dy_sum.to(bias_dtype)


def _fake_output(x, weight, bias, inv_std, r, buffer_gz, row, early, out_dtype, flags, sync):
    return torch.empty_like(x, dtype=out_dtype)


def _fake_backward(dy, x, weight, inv_std, r, buffer_gz, row, early, bias_dtype, flags, sync,
                   need_dx):
    return (torch.empty_like(x) if need_dx else x.new_empty(0), torch.empty_like(weight),
            torch.empty_like(weight, dtype=bias_dtype))


_TRAIN_OUTPUT = Operator('mabn_train_output', _train_output, _fake_output)
_TRAIN_BACKWARD = Operator('mabn_train_backward', _train_backward, _fake_backward,
                           mutates=('buffer_gz', 'flags'))


def _keep_for_backward(ctx, inputs, output):
    x, weight, bias, inv_std, r, buffer_gz, row, early, _, flags, sync = inputs
    ctx.save_for_backward(x, weight, inv_std, r, row, early)
    # not saved: other calls' backwards write them first
    ctx.buffer_gz, ctx.flags = buffer_gz, flags
    ctx.sync, ctx.bias_dtype = sync, bias.dtype


def _backward_args(ctx, dy, need_dx):
    x, weight, inv_std, r, row, early = ctx.saved_tensors
    return (dy, x, weight, inv_std, r, ctx.buffer_gz, row, early, ctx.bias_dtype, ctx.flags,
            ctx.sync, need_dx)


train_step = with_backward(_TRAIN_OUTPUT, _keep_for_backward, _TRAIN_BACKWARD,
                           _backward_args)
train_step.__doc__ = """The training step of MABN as one autograd node (one operator under
torch.compile, see :mod:`mmnorm.layers.operators`).

Inputs: ``x`` (N, C, *), ``weight``/``bias`` (C,), and constants computed by
:meth:`MABN._train_forward` for this step: ``inv_std`` = 1 / sqrt(v_t + eps)
and ``r``, both (C,) in the statistics dtype; the layer's ``buffer_gz``, which
the backward writes; ``row`` = [t mod m] and ``early`` (t <= m or t <
warmup_iters), both computed at this call's forward, so the backward writes
the row of its own step even if the layer has been called again since; the
output dtype; the layer's ``step_flags`` (its non-finite flag); and ``sync``:
with ``sync_stats`` in a multi-process run, psi_t is the union's (sum(dy * x)
and the element count are all-reduced; the backward is then a collective).

Forward: ``y = x * (weight * r * inv_std) + bias``, one fused pass.

Backward, which terms are exact and which are moving averages:

* exact: g = dy * weight * r, the batch statistic psi_t = mean(g * z),
  dweight = sum(dy * r * z) and dbias = sum(dy) are the exact values for
  this batch; the factor 1 / sqrt(v_t + eps) is the very v_t the forward
  used; r is a constant in both passes (no gradient flows through r).
* while ``early``: psi = psi_t and v_t = chi2_t, so dx is the exact gradient
  of the forward (checked by ``gradcheck`` in the tests).
* afterwards, moving averages: v_t in the forward is the SMA of chi2 over the
  last m steps, and psi in dx is the SMA of psi_t over the last m backward
  steps (this step's row included). This is the paper's approximation, not
  the gradient of the forward: with the past rows of buffer_x2 constant, that
  gradient would use psi_t / m (the current batch's share of the SMA),
  whereas MABN uses (psi_t + the m - 1 other rows of buffer_gz) / m, i.e. the
  past batches' psi stands in for the noisy present one.

``dx = (g - z * psi) / sqrt(v_t + eps)`` is evaluated as
``dy * (weight * r * inv_std) - x * (psi * inv_std^2)`` with per-channel
coefficients, i.e. without forming g or z; the first product and the two
sums sum(dy * x), sum(dy) come from one pass (:func:`scaled_grad_and_sums`).
"""


@MODELS.register_module('MABN')
class MABN(SmallBatchNorm):
    """Moving-average batch normalization (Yan et al., ICLR 2020; see the
    module docstring for the equations).

    Args:
        num_features (int): C, the number of channels on dim 1.
        eps (float): added to the second moment under the root. Default 1e-5.
        momentum (float): weight of the OLD value in the running_var EMA:
            ``running_var <- momentum * running_var + (1 - momentum) * v_t``.
            Default 0.98.
        buffer_size (int): m, the SMA window in training steps (calls). The
            detection recipe simulates a batch of 32 with 2 images per GPU:
            m = 16. Default 16.
        warmup_iters (int): the batch statistics chi2_t and psi_t are used
            while t < warmup_iters (and while t <= m, until the window is
            full). Default 100.
        renorm_start_iter (int): r = 1 while t <= max(renorm_start_iter,
            warmup_iters). Default 1000.
        rmax (float): afterwards r is clipped to [1/rmax, rmax], rmax >= 1.
            Default 5.0.
        sync_stats (bool): use the statistics of all processes' inputs
            (see "Processes"). Default False.

    Buffers, all in the state dict: ``running_var`` (C,), ``num_batches_tracked``
    (the step counter t), ``buffer_x2`` (m, C) and ``buffer_gz`` (m, C); float32,
    float64 after ``.double()``, and still float32 after ``.half()`` or
    ``.to(torch.bfloat16)``. There is no ``running_mean``: MABN does not centre.

    Calls per step: the window advances once per training *call*, not once
    per optimizer step. A module called k times per optimizer step (a head
    shared across pyramid levels, called k times before one backward, or
    gradient accumulation over k iterations) increments t k times, writes k
    rows of ``buffer_x2`` in the forward passes and, in the backward passes,
    k rows of ``buffer_gz``, each call to the row of its own t. With
    the default m = 16 (2 images x 16 steps = 32 images) such a module's window
    therefore covers 16 calls, i.e. 16 / k optimizer steps; set ``buffer_size``
    (and the iteration thresholds, which also count calls) accordingly. In the
    moving-average phase a call's backward averages the ``buffer_gz`` rows
    present when it runs (autograd runs later calls' backward first). If no
    gradient reaches a call (nothing requires grad), its ``buffer_gz`` row keeps
    its older value. Activation checkpointing (``with_cp=True`` in MMDetection's
    ResNet) re-runs the forward during the backward, which is one more call.

    Non-finite statistics: a channel whose chi2_t (forward) or psi_t (backward)
    is inf/NaN keeps the previous value of its row (the value written m steps
    earlier), the layer warns once (when its flag is read, see
    :meth:`report_nonfinite`), and the counter still advances. On such a
    step v_t (and psi) is defined as for any other step *from the buffer as it
    stands after the guarded write*: in the moving-average phase it is the
    mean of the m rows, one of them stale, so it stays finite; in the early
    phase it is the batch statistic itself, which is non-finite, so that
    channel's output (or input gradient) is non-finite, as BN's would be and
    as the input was. ``running_var`` is only updated where the new value is
    finite. The next finite step trains normally.

    Processes: by default (``sync_stats=False``), as in the paper, each
    process of a DDP run keeps its own statistics; the buffers differ between
    ranks and a checkpoint (written by rank 0) holds rank 0's. With
    ``sync_stats=True``, when torch.distributed is initialised with more than
    one process (otherwise the key changes nothing), each training call uses
    the statistics of the union of all processes' inputs: chi2_t = (sum over
    processes of sum(x^2)) / (total element count) in the forward (one
    all-reduce of C + 1 numbers) and psi_t likewise in the backward, weighted
    by element counts. All processes then write the same rows and hold the
    same buffers, and the window of m calls covers world_size times more
    samples. psi_t is linear in the incoming gradient: each process
    backpropagates its own loss (DDP averages the parameter gradients
    afterwards), so psi_t is that of a single process on the union whose loss
    is the sum of the processes' losses. The backward's all-reduce is a
    blocking collective inside autograd: the k-th synchronised MABN backward of
    one process meets the k-th of the others. Autograd runs the nodes of a
    graph in an order fixed by the graph (dependencies, then creation order),
    so processes that build the same graph - the same layers called the same
    number of times, in the same order - run these backwards in the same
    order; DDP's own gradient all-reduces are issued from the same backward
    pass in the same order on every process and do not reorder them. Hence
    every process must call the layer as often as the others and
    backpropagate through every call (a process whose loss ignores a call's
    output leaves the others waiting, as with SyncBatchNorm). An empty input
    takes part with a count of 0 and then also advances t and writes the
    union's rows; if the union is empty, t advances and nothing is written.

    Loading state dicts (reported through mmengine's logger, see
    :meth:`convert_state`): a BatchNorm checkpoint (weight, bias, running_mean,
    running_var, num_batches_tracked) and a checkpoint of the original
    authors' ``MABN2d`` (running_var (1, C, 1, 1), counter ``iters``,
    ``buffer_x2`` and ``buffer_gz`` (m, C)) both load, also with
    ``strict=True``.
    """

    STATISTIC_BUFFERS = ('running_var', 'buffer_x2', 'buffer_gz')
    SUBTRACTS_MEAN = False
    FUSED_STEP = FUSED_SYNC = True

    def __init__(self, num_features, eps=1e-5, momentum=0.98, buffer_size=16, warmup_iters=100,
                 renorm_start_iter=1000, rmax=5.0, sync_stats=False):
        super().__init__(num_features, eps, momentum, sync_stats)
        name = type(self).__name__
        self.buffer_size = check_number(name, 'buffer_size', buffer_size, integer=True, minimum=0)
        self.warmup_iters = check_number(name, 'warmup_iters', warmup_iters, integer=True,
                                         minimum=0, exclusive=False)
        self.renorm_start_iter = check_number(name, 'renorm_start_iter', renorm_start_iter,
                                              integer=True, minimum=0, exclusive=False)
        self.rmax = check_number(name, 'rmax', rmax, minimum=1, exclusive=False)
        # BatchNorm's running_mean does not exist for MABN (None buffers are not saved).
        self.register_buffer('running_mean', None)
        like = self.running_var
        self.register_buffer('buffer_x2', like.new_zeros(buffer_size, num_features))
        self.register_buffer('buffer_gz', like.new_zeros(buffer_size, num_features))

    @property
    def renorm_after(self):
        """r = 1 while t <= this step."""
        return max(self.renorm_start_iter, self.warmup_iters)

    def reset_running_stats(self):
        # Also called by _BatchNorm.__init__, before running_mean is removed and
        # before the window buffers exist.
        if self._buffers.get('running_mean') is not None:
            self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()
        for name in ('buffer_x2', 'buffer_gz'):
            if self._buffers.get(name) is not None:
                self._buffers[name].zero_()

    # -------------------------------------------------------------- training
    def _train_forward(self, x, sync):
        out_dtype = autocast_output_dtype(x)
        if self._fused_now:
            y, saved = self._fused_call(x, out_dtype, sync)
            self._keep_for_replay(x, ('fused', saved, out_dtype, sync))
            return y
        cdtype = self.stats_dtype(x)
        with without_autocast(x.device.type):
            with torch.no_grad():
                t = self.num_batches_tracked
                row = torch.remainder(t, self.buffer_size).view(1)
                early = (t <= self.buffer_size) | (t < self.warmup_iters)
                count = x.numel() // x.size(1)
                # One pass over x; the cast comes before squaring (no fp16 overflow).
                chi2 = torch.linalg.vector_norm(x, 2, self.reduce_dims(x), dtype=cdtype)
                present = None
                if sync:
                    chi2, total = union_mean(chi2.square(), count)
                    present = total > 0
                else:
                    chi2 = chi2.square().div_(count)
                v = window_statistic(self.buffer_x2, row, early, chi2, self.step_flags,
                                     present)
                std = (v + self.eps).sqrt()
                running = self.running_var.to(cdtype)
                ratio = std / (running + self.eps).sqrt()
                r = torch.where(t > self.renorm_after, ratio.clamp(1 / self.rmax, self.rmax),
                                torch.ones_like(ratio))
                new_running = self.momentum * running + (1 - self.momentum) * v
                update = torch.isfinite(new_running)
                if present is not None:
                    update = update & present
                self.update_where_finite(self.running_var, new_running, update)
                inv_std = std.reciprocal()
            self._keep_for_replay(x, ('aten', inv_std, r, row, early, out_dtype, sync))
            return train_step(x, self.weight, self.bias, inv_std, r, self.buffer_gz, row, early,
                              out_dtype, self.step_flags, sync)

    def _fused_call(self, x, out_dtype, sync, former=None):
        return fused_train_step(x, self.weight, self.bias, self.running_var, self.buffer_x2,
                                self.buffer_gz, self.num_batches_tracked, self.step_flags,
                                self.eps, self.momentum, self.warmup_iters, self.renorm_after,
                                self.rmax, out_dtype, sync, former=former)

    def _replay(self, x, record):
        if record[0] == 'fused':
            _, saved, out_dtype, sync = record
            return self._fused_call(x, out_dtype, sync, former=saved)[0]
        _, inv_std, r, row, early, out_dtype, sync = record
        with without_autocast(x.device.type):
            return train_step(x, self.weight, self.bias, inv_std, r, self.buffer_gz, row, early,
                              out_dtype, self.step_flags, sync)

    # ------------------------------------------------------------- inference
    def _eval_forward(self, x):
        # BatchNorm's inference kernel with a zero mean: one pass, as fast as BN.
        weight, bias, running_var = self.weight, self.bias, self.running_var
        kept = self.__dict__.get('_zeros')
        if (not compiling() and kept is not None and kept[0] is running_var
                and kept[1] is x.dtype is running_var.dtype is weight.dtype
                and not any_autocast_enabled()):
            # The common case in as few Python steps as can be: after a large
            # kernel each step runs from cold caches, and a few more cost 2-8%
            # of an inference call at the head shapes on the CPU (measured).
            return torch.batch_norm(x, weight, bias, kept[2], running_var,
                                    False, 0.0, self.eps, torch.backends.cudnn.enabled)
        cdtype = self.stats_dtype(x)
        args = (weight.to(cdtype), bias.to(cdtype), self._zero_mean(running_var, cdtype),
                running_var.to(cdtype), False, 0.0, self.eps, torch.backends.cudnn.enabled)
        if not autocast_state(x.device.type)[0]:
            return torch.batch_norm(x.to(cdtype), *args).to(x.dtype)
        with without_autocast(x.device.type):
            y = torch.batch_norm(x.to(cdtype), *args)
        return y.to(autocast_output_dtype(x))

    def _zero_mean(self, running_var, dtype):
        """Zeros shaped and placed like ``running_var`` (this layer's buffer),
        of ``dtype``; kept for the next call (as ``(running_var, dtype,
        zeros)``: moving or casting the layer makes new buffer objects), made
        anew while compiling."""
        if compiling():
            return running_var.new_zeros(running_var.shape, dtype=dtype)
        kept = self.__dict__.get('_zeros')
        if kept is not None and kept[0] is running_var and kept[1] is dtype:
            return kept[2]
        zeros = running_var.new_zeros(running_var.shape, dtype=dtype)
        self.__dict__['_zeros'] = (running_var, dtype, zeros)
        return zeros

    # ------------------------------------------------------ state-dict loads
    def convert_state(self, state_dict, prefix):
        """Bring a BatchNorm or original-MABN state dict into this layout, in
        place, and return one :class:`StateChange` per conversion (its note is
        logged by the base class).

        * ``running_mean`` (BatchNorm): with BatchNorm's weight, bias and
          running_var, folded by :func:`bn_to_mabn` (BatchNorm's eps taken as
          PyTorch's default, ``BN_EPS``), so the loaded layer computes what the
          BatchNorm computed, as ``mmnorm.convert`` does; otherwise dropped.
        * ``running_var`` of shape (1, C, 1, 1) (original code): reshaped to (C,).
        * ``iters`` (original code's counter, same meaning as t): renamed to
          ``num_batches_tracked``.
        * ``buffer_x2`` / ``buffer_gz`` absent (BatchNorm): fresh zeros. The
          counter is then reset to 0, whatever the checkpoint says: BN's
          ``num_batches_tracked`` counts BN steps, and with an empty window a
          large t would put the layer straight into the moving-average phase,
          averaging zeros. From t = 0 the layer uses batch statistics while the
          window refills and warm-up and the renormalisation delay run again,
          which is what fine-tuning from an ImageNet BN checkpoint needs.

        A state dict with no key of this layer at all is left alone, so that
        missing keys are reported as usual.
        """
        keys = ('weight', 'bias', 'running_var', 'running_mean', 'num_batches_tracked', 'iters',
                'buffer_x2', 'buffer_gz')
        if not any(prefix + key in state_dict for key in keys):
            return []
        changes = []
        key = prefix + 'running_mean'
        if key in state_dict:
            mean = state_dict.pop(key)
            names = [prefix + name for name in ('weight', 'bias', 'running_var')]
            if all(isinstance(state_dict.get(name), torch.Tensor) for name in names) and all(
                    state_dict[name].shape == mean.shape for name in names):
                weight, bias, var = (state_dict[name] for name in names)
                state_dict.update(zip(names, bn_to_mabn(weight, bias, mean, var, BN_EPS,
                                                        self.eps)))
                changes.append(StateChange(
                    'BatchNorm statistics: running_mean folded into weight, bias and the second '
                    f'moment running_var (bn_to_mabn, BatchNorm eps {BN_EPS}), so the layer '
                    'computes what the BatchNorm did (a CenConv in front still changes it)',
                    changed=('weight', 'bias', 'running_var'), dropped=('running_mean',)))
            else:
                changes.append(StateChange(
                    'running_mean is unused (MABN normalises the second moment without '
                    'centring); dropped', dropped=('running_mean',)))
        key = prefix + 'running_var'
        value = state_dict.get(key)
        if (isinstance(value, torch.Tensor) and value.dim() != 1
                and value.numel() == self.num_features):
            state_dict[key] = value.reshape(self.num_features)
            changes.append(StateChange(
                f'running_var of shape {tuple(value.shape)} (original MABN code) reshaped to '
                f'({self.num_features},)', changed=('running_var',)))
        key = prefix + 'iters'
        if key in state_dict and prefix + 'num_batches_tracked' not in state_dict:
            value = state_dict.pop(key)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.reshape(())
            state_dict[prefix + 'num_batches_tracked'] = value
            changes.append(StateChange(
                f'step counter iters = {_show(value)} (original MABN code) loaded as '
                'num_batches_tracked', renamed=(('iters', 'num_batches_tracked'),)))
        absent = [name for name in ('buffer_x2', 'buffer_gz') if prefix + name not in state_dict]
        if absent:
            for name in absent:
                state_dict[prefix + name] = torch.zeros_like(self._buffers[name])
            key = prefix + 'num_batches_tracked'
            old = state_dict.get(key)
            state_dict[key] = torch.zeros_like(self.num_batches_tracked)
            counter = ('num_batches_tracked (absent) is set to 0' if old is None else
                       f'num_batches_tracked = {_show(old)} is reset to 0')
            note = (f'{" and ".join(absent)} not in the checkpoint: the moving-average window '
                    f'starts empty (zeros) and {counter}, so batch statistics are used while the '
                    'window refills and warm-up and the renormalisation delay start over')
            reset = ('num_batches_tracked',)
            changes.append(StateChange(note, added=tuple(absent) + (reset if old is None else ()),
                                       changed=() if old is None else reset))
        return changes


def _show(value):
    """A checkpoint counter for a log note (read at load time, not per step)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.device.type == 'meta':
            return f'<tensor of shape {tuple(value.shape)}>'
        return str(int(value.reshape(())))
    return repr(value)
