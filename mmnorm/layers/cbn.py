"""CBN: cross-iteration batch normalization (Yao et al., "Cross-Iteration Batch
Normalization", CVPR 2021), spec section 3.

The layer averages the statistics of the last k + 1 training steps (k =
``buffer_num``), after moving each old statistic to the current weight theta_t
of the conv that feeds the layer with a first-order Taylor step. Per channel c,
with x the layer's input (the conv's output) and M = N * H * W:

    mu_t = mean(x)            nu_t = mean(x^2)         (attached to the graph)
    mu_tau(theta_t) = mu_tau + rho * <dmu_tau/dtheta, theta_t - theta_tau>
    nu_tau(theta_t) = nu_tau + rho * <dnu_tau/dtheta, theta_t - theta_tau>
    keep_tau        = nu_tau(theta_t) - mu_tau(theta_t)^2 >= 0     (per channel)
    mu     = mean over {t} + kept tau of mu
    sigma2 = max(mean over {t} + kept tau of nu  -  mu^2, 0)
    y      = weight * (x - mu) / sqrt(sigma2 + eps) + bias

Gradients flow through mu_t and nu_t only: the past statistics, their
derivatives, theta_t and theta_tau are constants. sigma2 is evaluated in the
algebraically identical pooled form mean_i(v_i + (mu_i - mu)^2), v_i = nu_i -
mu_i^2 (the current v_t is PyTorch BN's batch variance), which avoids the
cancellation of E[x^2] - mu^2 when |mu| >> std; with no past entry it is the
batch variance exactly. Every term is >= 0, so the clamp of the spec never
fires. The running statistics follow PyTorch BN: running_mean <- (1 - m) *
running_mean + m * mu_t, running_var <- (1 - m) * running_var + m * unbiased
var_t (momentum m weighs the NEW value, default 0.1).

Plain BN (batch statistics, the same running-statistic update, nothing stored)
is used during burn-in and when the input carries no gradient (grad mode off
or x.requires_grad False, e.g. a frozen stem); in eval mode (``norm_eval``,
frozen stages) the layer is BN with the running statistics.

Derivatives (computed in forward under ``no_grad``, no ``autograd.grad``):

* dmu/dtheta[o, c, i, j] is the mean, over samples and output positions, of the
  (zero-, reflect-, ... padded) input value seen by kernel offset (i, j). It
  does not depend on o within a group, so it is stored compactly with shape
  (C_in, kh, kw) - rows g * C_in/groups ... of group g - and obtained from the
  batch-summed input by one strided-view reduction: no convolution.
* dnu/dtheta = 2 / M * (weight gradient of the conv with grad_output = x): one
  ``convolution_backward`` call that computes only the weight gradient.

Finding the conv (nothing for the user to wire): the first CBN constructed in
a process installs one global module forward hook
(``torch.nn.modules.module.register_module_forward_hook``). For every module
call whose output is a tensor that requires grad, the hook records a small tag
for the output tensor in a module-level table keyed by the tensor (a weak
reference to it; the entry goes when the tensor is freed, and the tensor itself
is not touched, so pickling or copying activations is unaffected): for an
``nn.Conv2d`` a weak reference to the conv, the conv's input tensor and the
version counters of both; for any other module a weak reference to it, unless
the tensor still carries a valid tag (a module that returns a conv's output
unchanged keeps the conv as producer). At its
training forward, CBN reads the tag of its own input: the conv must be the
producer and neither tensor may have been modified in place since. Nothing is
stored on the layer across steps, so binding is unaffected by deepcopy, DDP,
``.to()``, checkpoint loading, and holds no reference that keeps a model alive.
This covers ResNet (stem, every block norm, ``downsample = Sequential(conv,
norm)``), mmcv's ``ConvModule`` (FPN, box and mask head convs) and any
``nn.Sequential(conv, norm)``. Supported producers: ``nn.Conv2d`` and mmcv's
``Conv`` wrapper (same computation), any ``nn.Conv2d`` subclass with a
``transformed_weight()`` method that convolves with that weight (mmnorm's
CenConv, WSConv: theta is then the transformed weight, which is what the
statistics depend on), all ``padding_mode`` values and string paddings. Any
other producer - an activation, a pooling, an unknown conv subclass, a module
called with its input as keyword, or a tensor changed in place - raises an
error that names the layer (its qualified name in the model that is being
called, found on the call stack) and the producer, unless ``rho=0``, which
needs no conv. The check runs at every training forward with gradient, burn-in
included, so a misplaced layer fails at the first step. Limitations: a conv
called through ``conv.forward(...)`` directly bypasses module hooks;
``torch.utils.checkpoint`` (``with_cp``) re-runs the forward during backward,
which counts a second step (as it updates BN's running statistics twice).
The history does not record which conv filled it: a layer fed by different
convs of the same weight shape (a norm shared across convs) is compensated
with whichever conv feeds the current step.

State (all buffers, saved in the state dict, on the layer's device, moved by
``.to()``): ``num_batches_tracked`` is the step counter t (incremented before
every training forward, also during burn-in; an empty input changes nothing);
``history_pushes`` counts pushes (ring slot = pushes mod k); the ring
``history_mean``/``history_sqmean`` (k, C), ``history_valid`` (k, C) int64
(1 = valid, 0 = not; an integer, not a bool, see "Averaging buffers" below),
``history_dmean`` (k, C_in, kh, kw), ``history_dsqmean`` and ``history_weight``
(k, *conv weight shape). The derivative buffers stay empty with rho = 0. The
ring's shapes are only known once the conv is seen: they are empty (0,) until
the first push, and loading a state dict shapes them like the incoming ones, so
a fresh layer loads a trained one's state and continues bit-for-bit. The
history is stored in the buffers' float dtype, at least float32. Windows and
counts are decided on the host from mirrors of the two counters, re-read from
the device when a counter tensor was replaced or changed in place (its version
counter) and after every ``train()`` call, so a step makes no device-to-host
synchronisation. ``train()`` is what catches writes through ``.data``, which
bump no version counter (mmengine's SyncBuffersHook writes so, between
epochs); mmengine's loops call it once per epoch (epoch-based) or per
iteration (iteration-based, right after their own host read of the loss), so
the re-read is two integers per layer at those points.

Burn-in: ``burnin`` iterations (steps of this layer), or ``burnin_epochs``
epochs, converted by :class:`mmnorm.engine.hooks.CBNBurninHook` with the run's real
iterations per epoch (``set_iters_per_epoch``); a layer stating epochs that no
hook converted raises at its first training forward instead of guessing.
Window w(t): with ``two_stage``, 0 while t <= burnin and k after; otherwise
int(k * min(t / burnin, 1)). w(t) = 0 means plain BN and no push; otherwise the
newest min(w(t), pushes) entries are averaged with the current step and the
current step is pushed. A layer called several times per iteration (a head
shared across levels) counts each call as a step.

Robustness: half inputs get float32 statistics and an output of the input's
dtype, and the running statistics and the history stay float32 when the
module is cast to float16 or bfloat16 (a variance above 65504 would be inf);
an empty input returns an empty output and changes no state (base class);
N * H * W = 1 works (running_var is then left unchanged: an unbiased
variance does not exist); a non-finite statistic never enters the running
statistics or the ring (non-finite numbers are stored as 0, the channel's
entry is flagged 0 in ``history_valid`` and never averaged), and the layer
warns once.

Loading a BatchNorm state dict (no history keys): the history starts empty and
the step counter restarts at 0 so that burn-in runs in full; both are logged.
DDP: by default (``sync_stats=False``), as in the paper, each rank keeps its
own history and running statistics, and a checkpoint (written by rank 0) holds
rank 0's; use ``broadcast_buffers=False`` (mmengine's default wrapper config),
otherwise DDP overwrites every rank's buffers with rank 0's at each forward, as
it does for BN's running statistics. With ``sync_stats=True``, when
torch.distributed is initialised with more than one process (otherwise the key
changes nothing), each step uses the statistics of the union of all processes'
inputs, as a single process that sees them all would: mu_t and nu_t (one
all-gather of 2C + 1 numbers per process, differentiable: the gradient reaches
every process's input, as in SyncBatchNorm) and the derivatives dmu/dtheta and
dnu/dtheta, which are per-process means too and are averaged weighted by
element counts (one all-reduce of the two derivative sums, C_in * kh * kw +
the weight's size; under DDP the conv weights, hence theta, are the same on
every process). The running statistics use the union's count. Every process
then pushes the same entries and holds the same buffers, and the window of
k + 1 steps covers world_size times more samples. The forward and backward are
collectives: every process must call the layer as often as the others and
backpropagate through every call; an empty input takes part with a count of 0
(and advances t and pushes like the others); if the union is empty, the step
pushes an entry flagged invalid and leaves the running statistics alone.

Averaging buffers (mmengine's SyncBuffersHook averages every buffer across
processes after each training epoch, the integers through a float32
division whose result is truncated): with ``sync_stats`` all processes hold
the same buffers, so the average changes nothing. Without it, when all
processes have taken the same number of steps (equal counters, ring slots
aligned), each averaged slot is the entry of the union of that step's
inputs (for equal batch sizes: the mean of the per-process means, second
moments and derivatives), a valid history; ``history_valid`` is an integer so
that its truncated mean is 1 only where the entry was valid on every process
(a bool would be or-ed, and a slot valid on one process only would average a
stored 0 in). Counters that differ (a process skipped empty inputs) become
their truncated mean, the same on every process, and the rings then mix steps
of different ages; the layer reads the new counters at the next ``train()``.
Averaged-model hooks that copy buffers into a copy made before the first
training step (mmengine's EMAHook) meet ring buffers of a different shape; such
a copy must be made after the first post-burn-in step.

Cost, measured on 2 CPU cores (1 thread, ``torch.nn.Conv2d`` + layer, forward +
backward, 2 images): 1.3-1.55x conv + ``BatchNorm2d`` at ResNet stage shapes
with 56x56 and 28x28 maps and at 50x50, 1.7x for a 256->256 3x3 conv on 14x14
maps, where the weight-sized work per step dominates (the weight-gradient
convolution is most of the extra; the two-``autograd.grad`` method costs
1.9-3.0x). The history holds 2k weight-sized tensors + k (C_in, kh, kw), about
6x the conv weight for k = 3 (float32, Mask R-CNN R-50-FPN: about 540 MiB for
the backbone, 77 MiB for the FPN, 54 MiB for each 4-conv head). The global hook
adds about 2-3 us per module call, about 0.3 % of a ResNet-50 forward.
"""
import sys
import weakref

import torch
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch import nn

from ._dist import all_reduce_sum, union_moments
from ._state import SmallBatchNorm, check_number

__all__ = ['CBN', 'conv_statistic_derivative_sums', 'conv_statistic_derivatives',
           'expand_mean_derivative']

# ------------------------------------------------------------ producer tags
_hook_handle = None


# id(tensor) -> (weakref to the tensor, weakref to its producer, conv input or
# None, tensor version, conv input version). Kept outside the tensors so that
# pickling, torch.save and deepcopy of activations are unaffected; an entry
# goes when its tensor is freed.
_TAGS = {}


def _forget(ref, key):
    entry = _TAGS.get(key)
    if entry is not None and entry[0] is ref:
        del _TAGS[key]


def _set_tag(tensor, module, conv_input):
    key = id(tensor)
    ref = weakref.ref(tensor, lambda r, key=key: _forget(r, key))
    _TAGS[key] = (ref, weakref.ref(module), conv_input, tensor._version,
                  None if conv_input is None else conv_input._version)


def _read_tag(tensor):
    """(producer ref, conv input, version, input version) or None."""
    entry = _TAGS.get(id(tensor))
    if entry is None or entry[0]() is not tensor:
        return None
    return entry[1:]


def _tag_producer(module, args, output):
    """Global forward hook: remember which module produced ``output``.
    Only outputs that require grad are tagged: CBN reads tags only then."""
    if not isinstance(output, torch.Tensor) or not output.requires_grad:
        return
    if isinstance(module, nn.Conv2d):
        conv_input = args[0] if args and isinstance(args[0], torch.Tensor) else None
        _set_tag(output, module, conv_input)
        return
    tag = _read_tag(output)
    if tag is None or tag[2] != output._version:
        _set_tag(output, module, None)


def _install_producer_hook():
    global _hook_handle
    if _hook_handle is None:
        _hook_handle = torch.nn.modules.module.register_module_forward_hook(_tag_producer)


_plain_conv_forwards = None


def _computes_like_conv2d(conv):
    """True if ``conv(x)`` is ``F.conv2d`` of x (after its padding mode) with
    ``conv.weight`` or, for classes with ``transformed_weight()``, that weight."""
    global _plain_conv_forwards
    if _plain_conv_forwards is None:
        forwards = {nn.Conv2d.forward}
        try:  # mmcv's 'Conv' (registered with force=True) only adds an empty-input path
            from mmcv.cnn.bricks.wrappers import Conv2d as MMCVConv2d
            forwards.add(MMCVConv2d.forward)
        except ImportError:  # pragma: no cover
            pass
        _plain_conv_forwards = forwards
    if 'forward' in vars(conv):  # an instance-level override (e.g. a fused eval path)
        return False
    return type(conv).forward in _plain_conv_forwards or callable(
        getattr(conv, 'transformed_weight', None))


def conv_weight(conv):
    """theta: the weight ``conv`` convolves with (detached)."""
    with torch.no_grad():
        transformed = getattr(conv, 'transformed_weight', None)
        weight = transformed() if callable(transformed) else conv.weight
    return weight.detach()


# ------------------------------------------------------------- naming
def _calling_root(layer, frame):
    """The outermost module on the call stack that contains ``layer``."""
    candidates = []
    while frame is not None:
        obj = frame.f_locals.get('self')
        if isinstance(obj, nn.Module):
            candidates.append(obj)
        frame = frame.f_back
    for module in reversed(candidates):
        if any(m is layer for m in module.modules()):
            inner = getattr(module, 'module', None)  # DataParallel / DDP wrappers
            if isinstance(inner, nn.Module) and any(m is layer for m in inner.modules()):
                module = inner
            return module
    return None


def _describe(layer, *others):
    """Names of ``layer`` (and ``others``) in the model being called: a list of
    strings like "CBN 'neck.lateral_convs.0.bn'"."""
    root = _calling_root(layer, sys._getframe(1))
    names = {}
    if root is not None:
        for name, module in root.named_modules():
            names.setdefault(id(module), name or '<root>')
    out = []
    for module in (layer,) + others:
        if module is None:
            out.append(None)
            continue
        text = type(module).__name__
        if id(module) in names:
            text += f" '{names[id(module)]}'"
        out.append(text)
    if root is None:
        out[0] += f'({getattr(layer, "num_features", "")}) (not found in a calling module)'
    return out


# --------------------------------------------------------------- derivatives
def _explicit_padding(conv):
    """(pad for F.pad, mode) when the conv pads by itself or uses a string
    padding; None when its ``padding`` tuple is plain zero padding."""
    if isinstance(conv.padding, str) or conv.padding_mode != 'zeros':
        mode = 'constant' if conv.padding_mode == 'zeros' else conv.padding_mode
        return conv._reversed_padding_repeated_twice, mode
    return None


def conv_statistic_derivatives(conv, conv_input, conv_output, dtype=None, weight=None):
    """d mean(y_c) / d theta and d mean(y_c^2) / d theta for y = conv(x).

    They are ``(S_mu / M, S_nu * 2 / M)`` for the sums of
    :func:`conv_statistic_derivative_sums` and M = N * H_out * W_out.

    Args:
        conv (nn.Conv2d): the conv (stride, padding, padding_mode, dilation, groups).
        conv_input (Tensor): x, (N, C_in, H, W).
        conv_output (Tensor): y, (N, C_out, H_out, W_out) - bias included.
        dtype: the computation dtype (default: at least float32).
        weight (Tensor): theta, only its shape and dtype matter (default conv's).

    Returns:
        dmu (C_in, kh, kw): for output channel o of group g, dmu/dtheta[o] is
        ``dmu[g * C_in/groups:(g + 1) * C_in/groups]`` (see
        :func:`expand_mean_derivative`). Computed without a convolution.
        dnu (C_out, C_in/groups, kh, kw): one weight-gradient convolution.
    """
    n, _, h_out, w_out = conv_output.shape
    count = n * h_out * w_out
    patch_sum, weight_grad = conv_statistic_derivative_sums(conv, conv_input, conv_output, dtype,
                                                            weight)
    return patch_sum / count, weight_grad.mul_(2.0 / count)


def conv_statistic_derivative_sums(conv, conv_input, conv_output, dtype=None, weight=None):
    """The sums behind :func:`conv_statistic_derivatives`, for the same
    arguments: S_mu (C_in, kh, kw), the batch-summed (padded) input read at
    every kernel offset and summed over output positions, and S_nu (C_out,
    C_in/groups, kh, kw), the conv's weight gradient for grad_output = y.
    Sums over several inputs (processes) divided by their total M give the
    derivatives of the union."""
    if dtype is None:
        dtype = torch.promote_types(conv_output.dtype, torch.float32)
    if weight is None:
        weight = conv.weight
    _, _, h_out, w_out = conv_output.shape
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    explicit = _explicit_padding(conv)

    # S_mu: the batch-summed input, padded, read at every kernel offset.
    summed = (conv_input.sum(0) if conv_input.dtype == dtype
              else conv_input.sum(0, dtype=dtype))
    if explicit is None:
        ph, pw = conv.padding
        if ph or pw:
            summed = F.pad(summed, (pw, pw, ph, ph))
    else:
        summed = F.pad(summed[None], explicit[0], mode=explicit[1])[0]
    summed = summed.contiguous()
    c_in, hp, wp = summed.shape
    patches = summed.as_strided((c_in, kh, kw, h_out, w_out),
                                (hp * wp, dh * wp, dw, sh * wp, sw))
    patch_sum = patches.sum((3, 4))

    # S_nu: the weight gradient for grad_output = y.
    x = conv_input.to(dtype)
    padding = conv.padding
    if explicit is not None:
        x = F.pad(x, explicit[0], mode=explicit[1])
        padding = (0, 0)
    weight_grad = torch.ops.aten.convolution_backward(
        conv_output.to(dtype), x, weight.detach().to(dtype), None, conv.stride, padding,
        conv.dilation, False, [0, 0], conv.groups, (False, True, False))[1]
    return patch_sum, weight_grad


def expand_mean_derivative(dmu, weight_shape, groups):
    """The weight-shaped dmu/dtheta (C_out, C_in/groups, kh, kw) from the
    compact (C_in, kh, kw) one: every output channel of group g gets the rows of
    group g."""
    c_out = weight_shape[0]
    per_group = dmu.view(groups, 1, dmu.shape[0] // groups, *dmu.shape[1:])
    return per_group.expand(groups, c_out // groups, *per_group.shape[2:]).reshape(weight_shape)


# -------------------------------------------------------------- normalizing
def pooled_statistics(mu_t, var_t, past_mu, past_var, keep):
    """The window's mean and variance, the pooled form of the module
    docstring: mu = (mu_t + sum of kept past mu) / c and sigma2 = (var_t +
    (mu_t - mu)^2 + sum over kept of (var + (mu_tau - mu)^2)) / c, with c = 1 +
    the number of kept entries. mu_t, var_t (C,); past_mu, past_var (k, C),
    zero where not kept; keep (k, C) bool. Returns (mu, sigma2, c), each (C,)."""
    count = keep.sum(0).to(mu_t.dtype) + 1
    mu = (mu_t + past_mu.sum(0)) / count
    spread = torch.where(keep, past_var + (past_mu - mu).square(), 0).sum(0)
    sigma2 = ((var_t + (mu_t - mu).square() + spread) / count).clamp_min(0)
    return mu, sigma2, count


class _CrossIterationNorm(torch.autograd.Function):
    """y = weight * (x - mu) / sqrt(sigma2 + eps) + bias with the pooled
    statistics of the module docstring; differentiable in x (through mu_t and
    nu_t), weight and bias. Also returns mu_t and var_t (biased), not
    differentiable.

    Inputs past_mu, past_var (k, C) are the compensated past means and variances
    with kept entries only (the rest zero), keep (k, C) bool, or all None.

    Backward, with a = weight / sqrt(sigma2 + eps), xhat = (x - mu) / sqrt(...),
    c the per-channel count: dx = a * (g - mean(g) / c - xhat * mean(g xhat) / c),
    evaluated as PyTorch's batch-norm backward kernel with (mu, invstd) and
    weight / c, plus (1 - 1/c) * a * g.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, past_mu, past_var, keep, eps):
        with torch.autocast(x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)
            weight_c, bias_c = weight.to(dtype), bias.to(dtype)
            # PyTorch's batch-norm kernel: the batch statistics (two-pass, in
            # float32 for half input) and, with no past, the output, as BN.
            y, mu_t, invstd = torch.ops.aten.native_batch_norm(x, weight_c, bias_c, None, None,
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
        return y, mu_t, var_t

    @staticmethod
    def backward(ctx, grad_y, _grad_mu, _grad_var):
        x, weight, mu, invstd, count = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            scaled = weight if count is None else weight / count
            grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                grad_y, x, scaled, None, None, mu, invstd, True, ctx.eps, [True, True, True])
            if count is not None:
                shape = (1, -1) + (1,) * (x.dim() - 2)
                rest = (weight * invstd * (1 - 1 / count)).view(shape)
                grad_x = grad_x.addcmul_(grad_y, rest.to(grad_x.dtype))
        return (grad_x, grad_weight.to(ctx.weight_dtype), grad_bias.to(ctx.bias_dtype),
                None, None, None, None)


# ----------------------------------------------------------------------- CBN
_HISTORY = ('history_mean', 'history_sqmean', 'history_valid', 'history_dmean',
            'history_dsqmean', 'history_weight')


def _history_buffer(key, shape, float_dtype, device=None):
    """Zeros for the ring buffer ``key``: int64 for ``history_valid`` (see
    "Averaging buffers" in the module docstring), ``float_dtype`` otherwise."""
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
            needs :class:`mmnorm.engine.hooks.CBNBurninHook` (or
            :meth:`set_iters_per_epoch`) before the first training step.
        sync_stats (bool): use the statistics of all processes' inputs (see
            "DDP" in the module docstring). Default False: each process keeps
            its own, as in the paper.
    """

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
        self._last_conv = None
        _install_producer_hook()

    # ------------------------------------------------------------ pickling
    def __getstate__(self):
        state = super().__getstate__()
        state['_host'] = {}
        state['_last_conv'] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        _install_producer_hook()  # a model unpickled in a fresh process

    def train(self, mode=True):
        self._host = {}  # re-read the counters: they may have been written through .data
        return super().train(mode)

    @property
    def last_conv(self):
        """The conv whose weight the last training forward used (or None);
        held weakly, for inspection only."""
        return None if self._last_conv is None else self._last_conv()

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
            layer = _describe(self)[0]
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
        if cached is not None and cached[0]() is buffer and cached[1] == buffer._version:
            return cached[2]
        value = int(buffer)
        self._host[name] = (weakref.ref(buffer), buffer._version, value)
        return value

    def _increment(self, name):
        value = self._host_count(name) + 1
        buffer = getattr(self, name)
        buffer.add_(1)
        self._host[name] = (weakref.ref(buffer), buffer._version, value)
        return value

    # ------------------------------------------------------------ binding
    def _producer(self, x):
        """(conv, conv input) that produced ``x``, or raise naming the layer."""
        tag = _read_tag(x)
        problem, producer = None, None
        if tag is None:
            op = type(x.grad_fn).__name__ if x.grad_fn is not None else 'a leaf tensor'
            problem = f'its input was not produced by a module (it comes from {op})'
        else:
            producer = tag[0]()
            if tag[2] != x._version:
                problem = 'its input was modified in place after {} produced it'
            elif tag[1] is None or not isinstance(producer, nn.Conv2d):
                problem = 'its input comes from {}, not from a conv'
                if isinstance(producer, nn.Conv2d):
                    problem = '{} was called with its input as a keyword argument'
            elif tag[1]._version != tag[3]:
                problem = 'the input of {} was modified in place after the conv ran'
            elif not _computes_like_conv2d(producer):
                problem = ('{} overrides forward, so its derivatives are unknown (supported: '
                           'nn.Conv2d, mmcv Conv, convs with transformed_weight())')
            elif x.dim() != 4:
                problem = 'its input from {} is not 4-D'
        if problem is None:
            return producer, tag[1]
        layer, source = _describe(self, producer)
        if source is not None:
            problem = problem.format(source)
        raise RuntimeError(
            f'{layer}: {problem}. CBN with rho={self.rho} compensates the statistics with the '
            'weight of the conv that directly feeds it; place it right after a conv '
            '(conv -> CBN -> activation), or set rho=0 for the uncompensated '
            'cross-iteration average.')

    # ------------------------------------------------------------ history
    def _history_dtype(self):
        return torch.promote_types(self.running_mean.dtype, torch.float32)

    def _ensure_history(self, shapes):
        """Allocate the ring with ``shapes`` (name -> shape without k) or check
        that it has them."""
        k = self.buffer_num
        empty = self._host_count('history_pushes') == 0
        for key, shape in shapes.items():
            want = (k,) + tuple(shape)
            have = getattr(self, key)
            if tuple(have.shape) == want:
                continue
            if not empty and have.numel() > 0:
                layer = _describe(self)[0]
                raise RuntimeError(
                    f'{layer}: the stored history {key} has shape {tuple(have.shape)}, but this '
                    f'step needs {want}; the conv that feeds the layer changed shape (or '
                    'buffer_num changed)')
            setattr(self, key, _history_buffer(key, want, self._history_dtype(),
                                               self.running_mean.device))

    def _ages(self, device):
        """Age of every ring slot in steps (0 = newest), as a (k,) tensor."""
        pushes = self._host_count('history_pushes')
        k = self.buffer_num
        return (pushes - 1 - torch.arange(k, device=device)) % k

    def past_statistics(self, weight=None, window=None, dtype=None):
        """The stored steps moved to ``weight`` (theta_t; None: uncompensated).

        Returns (mu, nu, keep, ages), each with k rows in ring order: the
        compensated means and second moments (k, C), the spec's keep mask (k, C)
        (in the newest ``window`` steps, finite when stored, compensated
        variance >= 0) and each row's age (0 = newest). None if nothing is
        stored.
        """
        pushes = self._host_count('history_pushes')
        if pushes == 0 or self.history_mean.numel() == 0:
            return None
        k = self.buffer_num
        window = k if window is None else window
        dtype = dtype or self._history_dtype()
        used = min(window, pushes, k)
        mu = self.history_mean.to(dtype)
        nu = self.history_sqmean.to(dtype)
        if weight is not None and self.rho != 0:
            # One stored step at a time: k is small, and weight-sized temporaries
            # (instead of k times that) avoid large-allocation churn on the CPU.
            theta = weight.to(dtype).flatten(1)  # (O, F)
            groups = self.history_dmean.shape[1] // self.history_weight.shape[2]
            mu_shift, nu_shift = [], []
            for slot in range(k):
                delta = theta - self.history_weight[slot].to(dtype).flatten(1)
                dmu = self.history_dmean[slot].to(dtype).flatten()  # shared within a group
                if groups == 1:
                    mu_shift.append(torch.mv(delta, dmu))
                else:
                    mu_shift.append(torch.linalg.vecdot(
                        delta.view(groups, -1, delta.shape[1]), dmu.view(groups, 1, -1)).flatten())
                nu_shift.append(torch.linalg.vecdot(
                    delta, self.history_dsqmean[slot].to(dtype).flatten(1)))
            mu = mu + self.rho * torch.stack(mu_shift)
            nu = nu + self.rho * torch.stack(nu_shift)
        ages = self._ages(mu.device)
        keep = (ages < used)[:, None] & (self.history_valid == 1) & (nu - mu.square() >= 0)
        return mu, nu, keep, ages

    # ------------------------------------------------------------ forward
    def _train_forward(self, x, sync):
        # Statistics, derivatives and compensation in the statistics dtype, never
        # in autocast's lower precision; the output keeps the input's dtype.
        with torch.autocast(x.device.type, enabled=False):
            return self._train_step(x, sync)

    def _train_step(self, x, sync):
        burnin = self.burnin_iters()
        with_grad = torch.is_grad_enabled() and x.requires_grad
        conv = conv_input = None
        if with_grad and self.rho != 0:
            conv, conv_input = self._producer(x)
            self._last_conv = weakref.ref(conv)
        t = self._increment('num_batches_tracked')
        window = self.window_size(t, burnin) if with_grad else 0
        dtype = self.stats_dtype(x)

        past = None
        theta = None
        if window > 0:
            if conv is not None:
                theta = conv_weight(conv)
            with torch.no_grad():
                past = self.past_statistics(theta, window, dtype)
        kept = (None, None, None)  # the kept past means and variances (zero elsewhere), keep
        if past is not None:
            mu, nu, keep, _ = past
            kept = (torch.where(keep, mu, 0), torch.where(keep, nu - mu.square(), 0), keep)
        union_count = None
        if sync:
            y, mu_t, var_t, union_count = self._union_normalize(x, dtype, *kept)
        else:
            y, mu_t, var_t = _CrossIterationNorm.apply(x, self.weight, self.bias, *kept, self.eps)
        with torch.no_grad():
            finite = torch.isfinite(mu_t) & torch.isfinite(var_t)
            self.warn_if_nonfinite(finite)
            if sync:
                finite = finite & (union_count > 0)
            if window > 0:
                self._push(x, mu_t, var_t, finite, conv, conv_input, theta, dtype, union_count)
            self._update_running(x, mu_t, var_t, finite, union_count)
        return y

    def _union_normalize(self, x, dtype, kept_mu, kept_var, keep):
        """The output for ``sync_stats``: mu_t and var_t are the union's
        (:func:`mmnorm.layers._dist.union_moments`), pooled with the kept past
        entries (or None) as in :class:`_CrossIterationNorm`, whose equations this
        writes with autograd ops so that the gradient reaches every process's
        input through mu_t and var_t. Returns (y, mu_t, var_t, union count), the
        statistics detached."""
        xs = x.to(dtype)
        mu_t, var_t, count = union_moments(xs)
        mu, sigma2 = mu_t, var_t
        if keep is not None:
            mu, sigma2, _ = pooled_statistics(mu_t, var_t, kept_mu, kept_var, keep)
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
        shapes = {'history_mean': (self.num_features,), 'history_sqmean': (self.num_features,),
                  'history_valid': (self.num_features,)}
        if self.rho != 0:
            if union_count is None:
                dmu, dnu = conv_statistic_derivatives(conv, conv_input, x, dtype, theta)
            else:
                dmu, dnu = self._union_derivatives(conv, conv_input, x, dtype, theta,
                                                   union_count)
            shapes.update(history_dmean=dmu.shape, history_dsqmean=dnu.shape,
                          history_weight=theta.shape)
        self._ensure_history(shapes)
        slot = self._host_count('history_pushes') % self.buffer_num
        valid = finite
        if self.rho != 0:
            # A channel's entry is valid if all its numbers are finite; a sum is
            # finite only if every summand is (an overflowing sum also counts as
            # not finite). Non-finite numbers are stored as 0, one pass each.
            groups = conv.groups
            dmu_ok = torch.isfinite(dmu.reshape(groups, -1).sum(1))
            dmu_ok = dmu_ok.repeat_interleave(self.num_features // groups)
            valid = (valid & dmu_ok & torch.isfinite(dnu.flatten(1).sum(1))
                     & torch.isfinite(theta.flatten(1).sum(1)))
            for key, value in (('history_dmean', dmu), ('history_dsqmean', dnu),
                               ('history_weight', theta)):
                target = getattr(self, key)[slot]
                torch.nan_to_num(value.to(target.dtype), 0.0, 0.0, 0.0, out=target)
        self.history_mean[slot] = torch.where(valid, mu_t, 0)
        self.history_sqmean[slot] = torch.where(valid, var_t + mu_t.square(), 0)
        self.history_valid[slot] = valid
        self._increment('history_pushes')

    def _update_running(self, x, mu_t, var_t, finite, union_count=None):
        """BN's running-statistic update from this step's mu_t and biased var_t
        (C,); the unbiased variance uses x's count, or ``union_count`` (0-dim
        tensor, sync_stats), where running_var changes only if it is > 1."""
        m = self.momentum
        new_mean = (1 - m) * self.running_mean + m * mu_t
        self.update_where_finite(self.running_mean, new_mean, finite)
        if union_count is not None:
            unbias = union_count / (union_count - 1).clamp_min(1)
            new_var = (1 - m) * self.running_var + m * var_t * unbias
            self.update_where_finite(self.running_var, new_var, finite & (union_count > 1))
            return
        count = x.numel() // x.size(1)
        if count > 1:
            new_var = (1 - m) * self.running_var + m * var_t * (count / (count - 1))
            self.update_where_finite(self.running_var, new_var, finite)

    # --------------------------------------------------------- state dict
    def convert_state(self, state_dict, prefix):
        """A BatchNorm layout (no history keys): start with an empty history
        and restart the step counter, logged. Then shape the ring buffers like
        the incoming ones, so that a fresh layer can load a trained one."""
        notes = []
        keys = [prefix + key for key in _HISTORY + ('history_pushes',)]
        if not any(key in state_dict for key in keys) and prefix + 'running_mean' in state_dict:
            for key in _HISTORY:
                state_dict[prefix + key] = _history_buffer(key, 0, torch.float32)
            state_dict[prefix + 'history_pushes'] = torch.tensor(0, dtype=torch.long)
            note = 'BatchNorm layout: no cross-iteration history, it starts empty'
            counter = state_dict.get(prefix + 'num_batches_tracked')
            if counter is not None:
                state_dict[prefix + 'num_batches_tracked'] = torch.zeros_like(counter)
                note += (f'; the step counter num_batches_tracked ({int(counter)} BN steps) '
                         'restarts at 0 so that burn-in runs in full')
            notes.append(note)
        for key in _HISTORY:
            incoming = state_dict.get(prefix + key)
            if isinstance(incoming, torch.Tensor) and incoming.shape != getattr(self, key).shape:
                setattr(self, key, _history_buffer(key, incoming.shape, self._history_dtype(),
                                                   self.running_mean.device))
        return notes

    def extra_repr(self):
        burnin = (f'burnin_epochs={self.burnin_epochs}' if self.burnin_epochs is not None
                  else f'burnin={self.burnin}')
        return (f'{self.num_features}, eps={self.eps}, momentum={self.momentum}, '
                f'buffer_num={self.buffer_num}, rho={self.rho}, {burnin}, '
                f'two_stage={self.two_stage}, sync_stats={self.sync_stats}')
