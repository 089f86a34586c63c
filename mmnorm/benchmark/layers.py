"""Speed and memory of mmnorm's layers, each next to its baseline, in one run:
what tools/benchmark_layers.py measures and writes.

With ``--out``, the plot of the fwd+bwd and eval ratios (grouped bars per layer
and shape, the aims as red lines) is written next to the markdown, with the
suffix .png; ``--plot-from`` draws it from the table of an earlier run instead
of measuring.

For every layer and every shape, the layer and its baseline are built at the
same shape and measured alternately (layer, baseline, baseline, layer, ...), so
that a change in the machine's load hits both; each number is the median of at
least ``--repeats`` samples taken after warm-up, and of more while they took
less than ``--min-time`` seconds (a cheap layer gets many samples, which the
noise of a shared machine needs). Ratios are layer / baseline. Each sample is
wall-clock time (``time.perf_counter``) between device synchronizations: on
CUDA, ``torch.cuda.synchronize`` before the step, after the forward and after
the backward, so a time holds the kernels and the Python launching them. The
default ``--min-time`` is 1 s on the CPU and 0.05 s on CUDA (a full run at
``--scale 1``, every row, both dtypes and both memory formats, is meant to
take 1-2 minutes on an H100).

Every row is measured once per ``--dtype`` and ``--memory-format``, each a
set of rows of its own (the 'dtype' and 'memory format' columns):

* float32: plain float32 modules and input;
* bfloat16: the same float32 modules and float32 input, with the forwards of
  layer and baseline under ``torch.autocast(device_type, dtype=torch.bfloat16)``
  (as in a mixed-precision network; the backward runs outside it, as usual);
  the incoming gradient has the output's dtype;
* channels_last: the input, the incoming gradient and the modules are
  converted with ``memory_format=torch.channels_last``.

With ``--compile``, the same trained modules, each wrapped in
``torch.compile(module, backend=--compile-backend)``, are measured alternately
again for fwd+bwd only; compilation happens in their warm-up (at least 2
calls, and more, up to 20, until a call compiles nothing: a layer that
recompiles at every call is timed once dynamo has given up on it), after
``torch.compiler.reset()`` so that each row compiles afresh for static
shapes. A compile failure becomes the cell's short error; frames still
compiled while timed are noted in the cell.

What is measured, per module:

* fwd: a training-mode forward with autograd recording (the input requires
  grad, as in the middle of a network);
* fwd+bwd: that same forward plus the backward of a fixed random incoming
  gradient (one training step of the layer; the two columns come from the
  same call);
* eval: an eval-mode forward under ``torch.no_grad()``;
* memory: on the CPU, torch has no peak-allocation counter, so the column is
  the bytes of the distinct storages that autograd saves for backward
  (``torch.autograd.graph.saved_tensors_hooks``) plus the output, leaving
  out the module's own parameters and buffers (resident anyway); on CUDA it is
  the peak of ``torch.cuda.max_memory_allocated`` during forward+backward above
  what was allocated before;
* ops + launches: the operators one training step (forward + backward, after
  the timed steps) dispatches, counted with a ``TorchDispatchMode`` (an
  ``mmnorm::`` operator of the fused path counts once, as ``native_batch_norm``
  does), plus the Triton kernels it launches: on a GPU each is a kernel launch
  (views and metadata ops aside) or a trip through the dispatcher, a cost per
  call that does not shrink with the tensors;
* buffers: the module's persistent buffers (running statistics, MABN's window,
  CBN's history);
* history: of those, the bytes of CBN's history ring (its ``history_*``
  buffers after warm-up, the push counter left out): what the layer keeps
  across steps, per layer.

Aims: on the CPU, the limits set for the CPU; on CUDA, the issue's aims on
one H100 (labelled 'H100 aim'): MABN and BRN fwd+bwd <= 1.3x BatchNorm2d,
conv + CBN <= 1.5x conv + BatchNorm2d, WSConv <= 1.05x Conv2d (fwd+bwd and
eval), MABN eval (unfolded) <= 1.05x BatchNorm2d eval; they hold for every
dtype and memory format.

Shapes, at 2 images per batch for an 800x1333 image padded to a multiple of 32
(800x1344); ``--scale s`` multiplies that image's sides by s and the number of
RoIs by s^2 (the same shrink of the head batches as of the image area), so
``--scale 1`` gives the real shapes:

* a ResNet-50 res2 stage activation (2, 256, H/4, W/4); conv rows use the
  bottleneck's last conv there, 1x1 64 -> 256;
* an FPN level P3 (2, 256, H/8, W/8); 3x3 256 -> 256;
* a 512-RoI box head batch (512, 256, 7, 7); 3x3 256 -> 256 (4conv1fc head);
* a 128-RoI mask head batch (128, 256, 14, 14); 3x3 256 -> 256.

Convs feeding a norm have no bias, as in MMDetection. FrozenBN is MMDetection's
frozen BN: ``nn.BatchNorm2d`` kept in eval mode (running statistics) with
weight and bias ``requires_grad=False`` (``norm_cfg=dict(type='BN',
requires_grad=False), norm_eval=True``); its input still requires grad, so the
backward computes dx. CBN is called as ``nn.Sequential(conv, CBN)`` and trained
burn-in + buffer_num steps before any timing, so that every timed step uses a
full, compensated history (checked).

CBN has two rows: against conv + BatchNorm2d ('Conv+CBN', with the issue's aim)
and against the reference 'Conv+CBN(autograd.grad)' ('--layers
Conv+CBN-vs-grad'), a conv + CBN written here the way the original CBN code
works: the statistics, their combination and the normalization as autograd
ops, and dmu/dtheta, dnu/dtheta from two ``torch.autograd.grad`` calls
(retain_graph) on the per-channel means of y and y^2 w.r.t. the conv weight,
stored weight-sized. It computes the same compensated statistics as mmnorm's
CBN (same k, rho, keep rule; tests/benchmark/test_layers.py checks outputs and
gradients against it).
"""
import contextlib
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..layers import BRN, CBN, MABN, CenConv, WSConv
from ..layers._kernels import LAUNCHES
from ..surgery.compile import keep_cbn_convs_eager
from ..studies.results import markdown_table

IMAGE = (800, 1333)  # MMDetection's 1x test/train scale, padded to a multiple of 32
SIZE_DIVISOR = 32


# ------------------------------------------------------------------ shapes
def padded_size(image, scale):
    """(H, W) of ``image`` with its sides times ``scale``, each rounded up to a
    multiple of SIZE_DIVISOR."""
    return tuple(math.ceil(side * scale / SIZE_DIVISOR) * SIZE_DIVISOR for side in image)


def scaled_count(n, scale):
    """RoI counts shrink with the image area (identity at scale 1)."""
    return max(1, round(n * scale * scale))


@dataclass(frozen=True)
class Shape:
    """Where in Mask R-CNN a norm runs: its input size and the conv before it."""
    name: str
    size: tuple  # (N, C, H, W) at the norm's input
    conv_in: int  # in_channels of the conv in the conv rows
    kernel: int  # its kernel size (padding kernel // 2 keeps H, W)

    @property
    def channels(self):
        return self.size[1]

    def describe(self):
        return (f'{self.name}: norm input {tuple(self.size)}; conv {self.kernel}x{self.kernel} '
                f'{self.conv_in} -> {self.channels}')


def make_shapes(scale):
    """The four shapes of the module docstring at ``scale``."""
    h, w = padded_size(IMAGE, scale)
    return [
        Shape('res2 stage', (2, 256, h // 4, w // 4), 64, 1),
        Shape('FPN P3', (2, 256, h // 8, w // 8), 256, 3),
        Shape('box head', (scaled_count(512, scale), 256, 7, 7), 256, 3),
        Shape('mask head', (scaled_count(128, scale), 256, 14, 14), 256, 3),
    ]


# ----------------------------------------------------------------- modules
class FrozenBN(nn.BatchNorm2d):
    """BatchNorm2d that stays in eval mode and whose affine parameters are
    frozen, as MMDetection's ResNet with norm_eval=True, requires_grad=False."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode=True):
        return super().train(False)


def conv(shape, cls=nn.Conv2d):
    """The conv of ``shape`` (a ``cls``), without a bias."""
    return cls(shape.conv_in, shape.channels, shape.kernel, padding=shape.kernel // 2, bias=False)


def bn(shape):
    return nn.BatchNorm2d(shape.channels)


def gn(shape):
    return nn.GroupNorm(32, shape.channels)


def frozen_bn(shape):
    return FrozenBN(shape.channels)


def mabn(shape):
    return MABN(shape.channels)


def brn(shape):
    return BRN(shape.channels)


def cbn(shape):
    return CBN(shape.channels)


def ws_conv(shape):
    return conv(shape, WSConv)


def cen_conv(shape):
    return conv(shape, CenConv)


class TwoGradCBN(nn.Module):
    """Reference: ``conv`` + cross-iteration BN as the original CBN code
    computes it (see the module docstring); k = ``buffer_num`` past steps,
    burn-in 0, BN with the running statistics in eval mode."""

    def __init__(self, conv, buffer_num=3, rho=1.0, eps=1e-5, momentum=0.1):
        super().__init__()
        self.conv, self.buffer_num, self.rho, self.eps, self.momentum = (
            conv, buffer_num, rho, eps, momentum)
        c, weight_shape = conv.out_channels, conv.weight.shape
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer('running_mean', torch.zeros(c))
        self.register_buffer('running_var', torch.ones(c))
        for key, shape in (('history_mean', (c,)), ('history_sqmean', (c,)),
                           ('history_dmean', weight_shape), ('history_dsqmean', weight_shape),
                           ('history_weight', weight_shape)):
            self.register_buffer(key, torch.zeros(buffer_num, *shape))
        self.history_pushes = 0

    def burnin_iters(self):
        return 0

    def forward(self, x):
        y = self.conv(x)
        if not self.training:
            return F.batch_norm(y, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        theta = self.conv.weight
        mu_t, nu_t = y.mean((0, 2, 3)), y.square().mean((0, 2, 3))
        # mu_c depends on theta[c] only: the gradient of the sum is per channel.
        dmu, = torch.autograd.grad(mu_t.sum(), theta, retain_graph=True)
        dnu, = torch.autograd.grad(nu_t.sum(), theta, retain_graph=True)
        mu_sum, nu_sum, count = mu_t, nu_t, 1
        for slot in range(min(self.history_pushes, self.buffer_num)):
            delta = theta.detach() - self.history_weight[slot]
            shift_mu = (self.history_dmean[slot] * delta).sum((1, 2, 3))
            shift_nu = (self.history_dsqmean[slot] * delta).sum((1, 2, 3))
            mu = self.history_mean[slot] + self.rho * shift_mu
            nu = self.history_sqmean[slot] + self.rho * shift_nu
            keep = nu - mu.square() >= 0
            mu_sum, nu_sum = mu_sum + torch.where(keep, mu, 0), nu_sum + torch.where(keep, nu, 0)
            count = count + keep
        mu = mu_sum / count
        sigma2 = (nu_sum / count - mu.square()).clamp_min(0)
        shape = (1, -1, 1, 1)
        out = ((y - mu.view(shape)) * (sigma2 + self.eps).rsqrt().view(shape)
               * self.weight.view(shape) + self.bias.view(shape))
        with torch.no_grad():
            slot = self.history_pushes % self.buffer_num
            for key, value in (('history_mean', mu_t), ('history_sqmean', nu_t),
                               ('history_dmean', dmu), ('history_dsqmean', dnu),
                               ('history_weight', theta)):
                getattr(self, key)[slot] = value
            self.history_pushes += 1
            n = y.numel() // y.size(1)
            self.running_mean.lerp_(mu_t, self.momentum)
            self.running_var.lerp_((nu_t - mu_t.square()) * (n / max(n - 1, 1)), self.momentum)
        return out


def conv_two_grad_cbn(shape):
    return TwoGradCBN(conv(shape))


def then(first, second):
    """A builder of ``nn.Sequential(first(shape), second(shape))``."""
    return lambda shape: nn.Sequential(first(shape), second(shape))


@dataclass(frozen=True)
class Aim:
    """A limit on one of a row's ratios."""
    metric: str  # 'fwd', 'fwd+bwd' or 'eval'
    limit: float  # met when the ratio is <= limit
    label: str


@dataclass(frozen=True)
class Row:
    """A layer and its baseline: builders of both from a ``Shape``, and the aims."""
    name: str
    baseline: str
    build: Callable
    build_baseline: Callable
    conv_input: bool = False  # the input is the conv's (conv_in channels)
    aims: tuple = ()  # on the CPU
    option: str = ''  # the --layers name, when ``name`` is shared with another row
    cuda_aims: tuple = ()  # on CUDA: the aims on one H100

    @property
    def key(self):
        return self.option or self.name

    def aims_on(self, device_type):
        """The aims that hold on ``device_type`` ('cuda' or 'cpu')."""
        return self.cuda_aims if device_type == 'cuda' else self.aims


def h100_aim(metric, limit, what=''):
    """One of the issue's aims on one H100 (CUDA rows)."""
    return Aim(metric, limit, f'{metric}{what} <= {limit}x (H100 aim)')


ROWS = [
    Row('MABN', 'BN', mabn, bn, aims=(Aim('fwd+bwd', 1.5, 'fwd+bwd <= 1.5x'),
                                      Aim('eval', 1.05, 'eval (unfolded) <= 1.05x')),
        cuda_aims=(h100_aim('fwd+bwd', 1.3), h100_aim('eval', 1.05, ' (unfolded)'))),
    Row('BRN', 'BN', brn, bn, aims=(Aim('fwd+bwd', 1.5, 'fwd+bwd <= 1.5x'),),
        cuda_aims=(h100_aim('fwd+bwd', 1.3),)),
    Row('GN', 'BN', gn, bn),
    Row('FrozenBN', 'BN', frozen_bn, bn),
    Row('Conv+CBN', 'Conv+BN', then(conv, cbn), then(conv, bn), conv_input=True,
        aims=(Aim('fwd+bwd', 1.6, 'fwd+bwd <= 1.6x'),), cuda_aims=(h100_aim('fwd+bwd', 1.5),)),
    Row('Conv+CBN', 'Conv+CBN(autograd.grad)', then(conv, cbn), conv_two_grad_cbn,
        conv_input=True, option='Conv+CBN-vs-grad'),
    Row('WSConv+GN', 'Conv+GN', then(ws_conv, gn), then(conv, gn), conv_input=True),
    Row('CenConv+MABN', 'Conv+BN', then(cen_conv, mabn), then(conv, bn), conv_input=True),
    Row('WSConv', 'Conv', ws_conv, conv, conv_input=True,
        aims=(Aim('fwd+bwd', 1.1, 'fwd+bwd <= 1.1x'),
              Aim('eval', 1.05, 'eval = 1.0x (<= 1.05x, noise)')),
        cuda_aims=(h100_aim('fwd+bwd', 1.05), h100_aim('eval', 1.05))),
    Row('CenConv', 'Conv', cen_conv, conv, conv_input=True),
]
MAX_ROUNDS = 1000
MIN_TIME = {'cpu': 1.0, 'cuda': 0.05}  # the default --min-time per device type
DTYPES = ('float32', 'bfloat16')
MEMORY_FORMATS = {'contiguous': torch.contiguous_format, 'channels_last': torch.channels_last}
COMPILE_WARMUP = 2  # at least this many warm-up calls of a compiled module
MAX_COMPILE_WARMUP = 20  # at most this many (dynamo's recompile limit is 8 per frame)


# ------------------------------------------------------------- measuring
def forward_context(device, dtype):
    """A maker of the context the forwards run in: ``torch.autocast`` to
    bfloat16 for 'bfloat16', nothing for 'float32'."""
    if dtype == 'float32':
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=getattr(torch, dtype))


def incoming_grad(grad):
    """``grad_for(y)``: the fixed incoming gradient ``grad`` in the dtype of
    the output ``y`` (bfloat16 under autocast), cast once per dtype."""
    cache = {grad.dtype: grad}

    def grad_for(y):
        if y.dtype not in cache:
            cache[y.dtype] = grad.to(y.dtype)
        return cache[y.dtype]
    return grad_for


def train_step(module, x, grad_for, sync, context):
    """One training step of ``module`` (the forward in ``context()``):
    (forward seconds, forward+backward seconds)."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    sync()
    start = time.perf_counter()
    with context():
        y = module(x)
    sync()
    middle = time.perf_counter()
    y.backward(grad_for(y))
    sync()
    return middle - start, time.perf_counter() - start


class OpCounter(TorchDispatchMode):
    """Counts the operators dispatched while it is active (an ``mmnorm::``
    operator of the fused path once, like ``native_batch_norm``; what runs
    inside either is not dispatched again) plus the Triton kernels launched."""

    def __init__(self):
        super().__init__()
        self.dispatched = 0

    @property
    def count(self):
        return self.dispatched + LAUNCHES.count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.dispatched += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(module, x, grad_for, context):
    """The operators and Triton launches of the :func:`train_step` of
    ``module`` (see :class:`OpCounter`): (forward, backward), read at the
    step's synchronisation points."""
    with OpCounter() as counter:
        marks = []
        train_step(module, x, grad_for, lambda: marks.append(counter.count), context)
    start, middle, end = marks
    return middle - start, end - middle


def eval_step(module, x, sync, context):
    """One eval-mode forward without autograd, in ``context()``: (seconds,)."""
    sync()
    start = time.perf_counter()
    with torch.no_grad(), context():
        module(x)
    sync()
    return (time.perf_counter() - start,)


def median_times(modules, step, warmups, repeats, min_time):
    """Run ``step(module)`` ``warmups[i]`` times per module, then in rounds
    that call every module once, alternating the modules (the order reversed
    every other round), until there are ``repeats`` rounds and the rounds took
    ``min_time`` seconds per module (at most MAX_ROUNDS). Returns, per module,
    the median of each number ``step`` returns."""
    for module, warmup in zip(modules, warmups):
        for _ in range(warmup):
            step(module)
    samples = [[] for _ in modules]
    order = list(range(len(modules)))
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or (time.perf_counter() - start < min_time * len(modules)
                               and rounds < MAX_ROUNDS):
        for j in (order if rounds % 2 == 0 else order[::-1]):
            samples[j].append(step(modules[j]))
        rounds += 1
    return [[statistics.median(column) for column in zip(*rows)] for rows in samples]


def memory_bytes(module, x, grad_for, device, context):
    """Memory of one training step (see the module docstring)."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with context():
            y = module(x)
        y.backward(grad_for(y))
        del y
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    resident = {t.untyped_storage().data_ptr()
                for t in list(module.parameters()) + list(module.buffers())}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in resident:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), context():
        y = module(x)
    pack(y)
    y.backward(grad_for(y))
    return sum(storages.values())


def buffer_bytes(module):
    return sum(b.nbytes for b in module.buffers())


def history_bytes(module):
    """Bytes of the CBN history rings in ``module`` (``history_*`` buffers;
    CBN's 0-d push counter left out)."""
    return sum(b.nbytes for name, b in module.named_buffers()
               if name.rsplit('.', 1)[-1].startswith('history_') and b.dim() > 0)


def cbn_layers(module):
    """The CBN layers in ``module`` (mmnorm's and the reference's)."""
    return [m for m in module.modules() if hasattr(m, 'buffer_num') and hasattr(m, 'burnin_iters')]


def steps_to_fill(module):
    """Training steps after which every CBN in ``module`` is past burn-in and
    has a full history."""
    return max([m.burnin_iters() + m.buffer_num for m in cbn_layers(module)], default=0)


def check_history_full(module):
    """Raise unless every CBN in ``module`` holds a full history."""
    for m in cbn_layers(module):
        pushes, k = int(m.history_pushes), m.buffer_num
        if pushes < k:
            raise RuntimeError(f'CBN history holds {pushes} of {k} steps after warm-up')


def describe_error(exc, limit=300):
    """``exc`` as one table cell: type and message, no '|' or newline, at most
    ``limit`` characters."""
    return f'{type(exc).__name__}: {exc}'.replace('|', '/').replace('\n', ' ')[:limit]


@dataclass
class Result:
    """The measurements of one row at one shape, dtype and memory format."""
    row: Row
    shape: Shape
    dtype: str = 'float32'
    memory_format: str = 'contiguous'
    layer: dict = field(default_factory=dict)  # metric -> seconds or bytes
    baseline: dict = field(default_factory=dict)
    error: str = ''
    compiled: tuple = ()  # compiled fwd+bwd seconds (layer, baseline), with --compile
    compile_note: str = ''  # why compiling failed (no ``compiled``), or a note on recompiles

    def ratio(self, metric):
        return self.layer[metric] / self.baseline[metric] if self.baseline[metric] else math.nan


def frames_compiled():
    """How many frames torch.compile (dynamo) has compiled in this process."""
    from torch._dynamo.utils import counters
    return counters['frames']['ok']


def compiled_times(modules, step, args):
    """((layer, baseline) median fwd+bwd seconds of ``torch.compile(module)``
    of both modules, note), or ((), a short error) when compiling or running
    one fails. The compilation happens in the warm-up: at least
    max(--warmup, COMPILE_WARMUP) calls, and more until a call compiles nothing
    (a layer that recompiles every call, at most MAX_COMPILE_WARMUP); the
    note says how often it still compiled while timed ('' if never)."""
    torch.compiler.reset()  # no compiled code of another row or shape: static shapes, no limit
    side = 'layer'
    try:
        for module in modules:  # a CBN's conv runs outside the graph with it
            keep_cbn_convs_eager(module)
        compiled = [torch.compile(module, backend=args.compile_backend)
                    for module in modules]
        for side, module in zip(('layer', 'baseline'), compiled):
            module.train()
            for call in range(MAX_COMPILE_WARMUP):
                before = frames_compiled()
                step(module)
                if call + 1 >= max(args.warmup, COMPILE_WARMUP) and \
                        frames_compiled() == before:
                    break
        side = 'timing'
        before = frames_compiled()
        times = median_times(compiled, step, [0, 0], args.repeats, args.min_time)
    except Exception as exc:  # noqa: BLE001  (a layer that does not compile yet is a cell)
        return (), f'{side}: {describe_error(exc, 120)}'
    recompiled = frames_compiled() - before
    return (tuple(fwd_bwd for _, fwd_bwd in times),
            f'compiled {recompiled} frames while timed' if recompiled else '')


def measure(row, shape, args, device, dtype='float32', memory_format='contiguous'):
    """Measure ``row`` at ``shape`` in ``dtype`` and ``memory_format`` (see the
    module docstring); an exception becomes ``Result.error``."""
    result = Result(row, shape, dtype, memory_format)
    try:
        torch.manual_seed(0)
        fmt = MEMORY_FORMATS[memory_format]
        modules = [row.build(shape).to(device, memory_format=fmt),
                   row.build_baseline(shape).to(device, memory_format=fmt)]
        n, c, h, w = shape.size
        x = torch.randn(n, shape.conv_in if row.conv_input else c, h, w, device=device)
        x = x.contiguous(memory_format=fmt).requires_grad_()
        grad_for = incoming_grad(torch.randn(shape.size, device=device).contiguous(
            memory_format=fmt))
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
        context = forward_context(device, dtype)

        def train(module):
            return train_step(module, x, grad_for, sync, context)

        for module in modules:
            module.train()
        warmups = [max(args.warmup, steps_to_fill(module)) for module in modules]
        trains = median_times(modules, train, warmups, args.repeats, args.min_time)
        for module in modules:
            check_history_full(module)
        memory = [memory_bytes(module, x, grad_for, device, context) for module in modules]
        ops = [ops_per_step(module, x, grad_for, context) for module in modules]
        if args.compile:
            result.compiled, result.compile_note = compiled_times(modules, train, args)
        for module in modules:
            module.eval()
        evals = median_times(modules, lambda m: eval_step(m, x, sync, context), [args.warmup] * 2,
                             args.repeats, args.min_time)
        for i, target in enumerate((result.layer, result.baseline)):
            target.update({'fwd': trains[i][0], 'fwd+bwd': trains[i][1], 'eval': evals[i][0],
                           'memory': memory[i], 'ops': ops[i], 'buffers': buffer_bytes(modules[i]),
                           'history': history_bytes(modules[i])})
    # One failing layer (e.g. cbn.py mid-edit) must not stop the run: it becomes a row.
    except Exception as exc:  # noqa: BLE001
        result.error = describe_error(exc)
    return result


def measure_rows(rows, shapes, args, device):
    """``measure`` every row at every shape, per dtype and memory format of
    ``args``, each one's time and status to stderr."""
    results = []
    for dtype in args.dtype:
        for memory_format in args.memory_format:
            for row in rows:
                for shape in shapes:
                    start = time.perf_counter()
                    result = measure(row, shape, args, device, dtype, memory_format)
                    results.append(result)
                    status = result.error or result.compile_note or 'ok'
                    print(f'[{row.key} @ {shape.name}, {dtype}, {memory_format}: '
                          f'{time.perf_counter() - start:.1f} s, {status}]',
                          file=sys.stderr, flush=True)
    return results


# ------------------------------------------------------------------ report
def fmt_ms(seconds):
    """Seconds as milliseconds with 3 significant digits or more."""
    ms = seconds * 1e3
    return f'{ms:.1f}' if ms >= 10 else f'{ms:.2f}' if ms >= 1 else f'{ms:.3f}'


def fmt_mb(nbytes):
    """Bytes as MiB with 2 significant digits or more."""
    mb = nbytes / 2**20
    return f'{mb:.1f}' if mb >= 10 else f'{mb:.2f}' if mb >= 0.1 else f'{mb:.3f}'


def aim_status(result, aim):
    """(ratio, 'met' / 'MISSED') of ``result`` for ``aim``."""
    ratio = result.ratio(aim.metric)
    return ratio, ('met' if ratio <= aim.limit else 'MISSED')


def load_average():
    """The 1, 5 and 15 minute load averages ('?' where the OS has none)."""
    return ', '.join(f'{v:.1f}' for v in os.getloadavg()) if hasattr(os, 'getloadavg') else '?'


OPS_COLUMN = 'ops + launches fwd+bwd (layer / base)'
COMPILED_COLUMNS = ('compiled fwd+bwd ms (layer / base)', 'layer compiled / eager x',
                    'compiled fwd+bwd x')


def compiled_cells(result):
    """The cells of COMPILED_COLUMNS: the compiled fwd+bwd times, the layer's
    compiled / eager ratio and the compiled layer / compiled baseline ratio."""
    if not result.compiled:
        return [f'compile failed: {result.compile_note}', '', '']
    layer, base = result.compiled
    note = f' ({result.compile_note})' if result.compile_note else ''
    return [f'{fmt_ms(layer)} / {fmt_ms(base)}{note}', f'{layer / result.layer["fwd+bwd"]:.2f}x',
            f'{layer / base:.2f}x']


def table(results, device, compiled=False):
    """The main table's lines: one row per result (with COMPILED_COLUMNS if ``compiled``)."""
    memory = 'peak memory' if device.type == 'cuda' else 'saved for backward + output'
    header = ['layer', 'baseline', 'shape', 'dtype', 'memory format', 'fwd ms (layer / base)',
              'fwd x', 'fwd+bwd ms (layer / base)', 'fwd+bwd x', OPS_COLUMN,
              'eval ms (layer / base)', 'eval x', f'{memory} MB (layer / base)', 'memory x',
              'buffers MB (layer / base)', 'CBN history MB (layer / base)',
              *(COMPILED_COLUMNS if compiled else ()), 'aim']
    rows = []
    for r in results:
        cells = [r.row.name, r.row.baseline, f'{r.shape.name} {"x".join(map(str, r.shape.size))}',
                 r.dtype, r.memory_format]
        if r.error:
            cells += [f'not measured: {r.error}'] + [''] * (len(header) - len(cells) - 1)
        else:
            for metric, fmt in (('fwd', fmt_ms), ('fwd+bwd', fmt_ms), ('eval', fmt_ms),
                                ('memory', fmt_mb)):
                cells += [f'{fmt(r.layer[metric])} / {fmt(r.baseline[metric])}',
                          f'{r.ratio(metric):.2f}x']
                if metric == 'fwd+bwd':
                    cells.append(' / '.join('{}+{}'.format(*side['ops'])
                                            for side in (r.layer, r.baseline)))
            cells.append(f'{fmt_mb(r.layer["buffers"])} / {fmt_mb(r.baseline["buffers"])}')
            history = [fmt_mb(side['history']) if side['history'] else '-'
                       for side in (r.layer, r.baseline)]
            cells.append(' / '.join(history) if history != ['-', '-'] else '-')
            if compiled:
                cells += compiled_cells(r)
            cells.append('; '.join(f'{aim.label}: {aim_status(r, aim)[1]}'
                                   for aim in r.row.aims_on(device.type)) or '-')
        rows.append(cells)
    return markdown_table(header, rows).splitlines()


def aims_summary(results, device):
    """The aims table's lines: per row, dtype, memory format and aim, the ratio
    at every shape and the worst."""
    rows = []
    for key in dict.fromkeys((r.row, r.dtype, r.memory_format) for r in results):
        mine = [r for r in results if (r.row, r.dtype, r.memory_format) == key]
        row = key[0]
        for aim in row.aims_on(device.type):
            measured = [r for r in mine if not r.error]
            ratios = ', '.join(f'{r.shape.name} {r.ratio(aim.metric):.2f}x' for r in measured)
            if len(measured) < len(mine):
                ratios += f'{", " if ratios else ""}{len(mine) - len(measured)} not measured'
            worst = max((r.ratio(aim.metric) for r in measured), default=math.nan)
            if math.isnan(worst):
                worst_text, verdict = '-', 'not measured'
            else:
                worst_text, verdict = f'{worst:.2f}x', 'met' if worst <= aim.limit else 'MISSED'
            rows.append([row.name, *key[1:], aim.label, ratios, worst_text, verdict])
    return markdown_table(['layer', 'dtype', 'memory format', 'aim', 'ratio per shape', 'worst',
                           'verdict'], rows).splitlines()


def driver_version():
    """The NVIDIA driver's version from nvidia-smi, or 'unknown'."""
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
    return out.split('\n')[0].strip() or 'unknown'


def device_text(device):
    """The device as the report's settings name it: on CUDA the GPU, driver,
    CUDA and cuDNN versions and the date; on the CPU the thread count."""
    if device.type != 'cuda':
        return f'device {device}, {torch.get_num_threads()} threads'
    return (f'device {device} ({torch.cuda.get_device_name(device)}, driver {driver_version()}, '
            f'CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), measured '
            f'{time.strftime("%Y-%m-%d")}')


def report(results, args, argv, device, shapes, load):
    """The markdown of the run: its settings, the main table and the aims."""
    command = ' '.join(['python tools/benchmark_layers.py'] + list(argv))
    lines = [
        '# Layer benchmark: mmnorm layers next to their baselines',
        '',
        f'Command: `{command}`  ',
        (f'torch {torch.__version__}, {device_text(device)}, scale {args.scale}; each time '
         'is the median of alternated samples (at least '
         f'{args.repeats}, and more until {args.min_time} s per module and mode, at most '
         f'{MAX_ROUNDS}) after {args.warmup} warm-up calls (CBN: after burn-in + buffer_num '
         'training steps).  '),
        (f'Load average at the start: {load} on {os.cpu_count()} CPUs (other processes '
         'running on the same cores make times noisy, more so with several threads).'),
        '',
        'Shapes (2 images per batch; `--scale 1` is an 800x1333 image, 512 and 128 RoIs):',
        '',
    ]
    lines += [f'- {shape.describe()}' for shape in shapes]
    lines += [
        '',
        'Ratios are layer / baseline at the same shape, measured alternately in this run. '
        'fwd: training forward with autograd; fwd+bwd: the same step with its backward; '
        'eval: eval-mode forward under no_grad; ATen ops: the operations one training step '
        'dispatches, forward+backward (on a GPU, each a launch and a trip through the '
        'dispatcher). '
        + ('Memory: peak of torch.cuda.max_memory_allocated during forward+backward. '
           if device.type == 'cuda' else
           'Memory: distinct storages saved for backward (saved_tensors_hooks) plus the '
           'output, without the module\'s parameters and buffers (CPU torch has no peak '
           'counter). ')
        + 'Buffers: persistent state; CBN history: the part of it that is CBN\'s ring '
        '(history_* buffers after warm-up), per layer. Conv+CBN(autograd.grad): the '
        'reference conv + CBN of the original code (two torch.autograd.grad calls for '
        'dmu/dtheta and dnu/dtheta, autograd-op normalization, same compensated statistics). '
        'FrozenBN: BatchNorm2d in eval mode with frozen affine '
        'parameters (MMDetection\'s norm_eval=True, requires_grad=False); its input requires '
        'grad. Convs have no bias.',
        '',
        'dtype bfloat16: the float32 modules and input with the forwards of layer and '
        f'baseline under torch.autocast(\'{device.type}\', dtype=torch.bfloat16), the '
        'incoming gradient in the output\'s dtype. memory format channels_last: input, '
        'incoming gradient and modules converted to torch.channels_last. '
        + (f'Compiled: the same trained modules in torch.compile(module, '
           f'backend=\'{args.compile_backend}\'), compiled during their warm-up (at least '
           f'{max(args.warmup, COMPILE_WARMUP)} calls, more until a call compiles nothing, at '
           f'most {MAX_COMPILE_WARMUP}), fwd+bwd alternately as above; layer compiled / eager '
           'x: the layer\'s compiled fwd+bwd time over its eager one; compiled fwd+bwd x: '
           'compiled layer / compiled baseline. '
           if args.compile else '')
        + ('Aims: the issue\'s aims on one H100 (H100 aim).' if device.type == 'cuda' else
           'Aims: the limits set for the CPU (the issue\'s H100 aims apply on CUDA).'),
        '',
    ]
    lines += table(results, device, args.compile)
    lines += ['', '## Aims', '']
    lines += aims_summary(results, device)
    return '\n'.join(lines) + '\n'


# -------------------------------------------------------------------- plot
PLOTTED = ('fwd+bwd', 'eval')


def group_label(row, dtype, memory_format):
    """The plot's name of a row in one dtype and memory format."""
    return f'{row.name}\nvs {row.baseline}\n{dtype}\n{memory_format}'


def points_from_results(results, device):
    """(group label, aims, shape name, {metric: ratio}) per measured result, for ``plot``."""
    return [(group_label(r.row, r.dtype, r.memory_format), r.row.aims_on(device.type),
             r.shape.name, {m: r.ratio(m) for m in PLOTTED})
            for r in results if not r.error]


def markdown_tables(markdown):
    """Every table in ``markdown`` as a list of rows of dicts (header -> cell)."""
    tables, current = [], None
    for line in markdown.splitlines():
        if not line.startswith('|'):
            current = None
            continue
        cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
        if current is None:
            header, current = cells, []
            tables.append(current)
        elif not set(''.join(cells)) <= set('-'):
            current.append(dict(zip(header, cells)))
    return tables


def points_from_markdown(markdown):
    """The same points, read back from the main table of ``report``'s markdown
    (the table with a 'shape' column; rows not measured are left out; a table
    without the dtype and memory format columns, written before they existed,
    is float32 and contiguous; the aims are CUDA's when the settings name a
    CUDA device)."""
    rows = {(row.name, row.baseline): row for row in ROWS}
    device_type = 'cuda' if re.search(r'\bdevice cuda', markdown) else 'cpu'
    main = next((t for t in markdown_tables(markdown) if t and 'shape' in t[0]), None)
    if main is None:
        raise ValueError('--plot-from: no table with a "shape" column in the markdown')
    points = []
    for record in main:
        if record['fwd ms (layer / base)'].startswith('not measured'):
            continue
        row = rows.get((record['layer'], record['baseline']))
        if row is None:
            raise ValueError(f'--plot-from: no benchmark row {record["layer"]} vs '
                             f'{record["baseline"]} (known: {sorted(rows)})')
        ratios = {m: float(record[f'{m} x'].rstrip('x')) for m in PLOTTED}
        label = group_label(row, record.get('dtype', 'float32'),
                            record.get('memory format', 'contiguous'))
        points.append((label, row.aims_on(device_type), record['shape'].rsplit(' ', 1)[0],
                       ratios))
    return points


def plot(points, path):
    """Grouped bars of the fwd+bwd and eval ratios: one group per benchmark row
    in one dtype and memory format, one bar per shape; each aim a red dashed
    line over its group."""
    from matplotlib.figure import Figure
    import numpy as np
    groups = list(dict.fromkeys((label, aims) for label, aims, _, _ in points))
    shapes = list(dict.fromkeys(shape for _, _, shape, _ in points))
    width = 0.8 / len(shapes)
    fig = Figure(figsize=(max(8.0, 1.7 * len(groups)), 7.5), layout='constrained')
    for axis, metric in zip(fig.subplots(len(PLOTTED), 1), PLOTTED):
        for j, shape in enumerate(shapes):
            xs, ys = zip(*[(groups.index((label, aims)) + (j - (len(shapes) - 1) / 2) * width,
                            ratios[metric])
                           for label, aims, name, ratios in points if name == shape])
            axis.bar(xs, ys, width, label=shape)
        for i, (_, aims) in enumerate(groups):
            for aim in aims:
                if aim.metric == metric:
                    axis.hlines(aim.limit, i - 0.45, i + 0.45, colors='red', linestyles='--')
        axis.axhline(1.0, color='black', linewidth=0.8)
        axis.set_xticks(np.arange(len(groups)), [label for label, _ in groups], fontsize='small')
        axis.set_ylabel(f'{metric}: layer / baseline')
        axis.legend(fontsize='small', title='shape (red dashes: aims)', title_fontsize='small')
    fig.suptitle('mmnorm layers next to their baselines (ratios of median times)')
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------- run
def redraw(markdown_path, read_table, draw):
    """Draw the plot of an earlier run next to ``markdown_path`` (suffix .png):
    ``draw(read_table(markdown), png_path)``; what --plot-from does."""
    source = Path(markdown_path)
    draw(read_table(source.read_text()), source.with_suffix('.png'))
    print(f'wrote {source.with_suffix(".png")}')


def run(args, argv):
    """Run the benchmark as tools/benchmark_layers.py's options ``args``
    (parsed from ``argv``) ask; print the markdown and return it (None with
    --plot-from)."""
    if args.plot_from:
        redraw(args.plot_from, points_from_markdown, plot)
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = load_average()
    shapes = make_shapes(args.scale)
    rows = [row for row in ROWS if not args.layers or row.key in args.layers]
    start = time.perf_counter()
    results = measure_rows(rows, shapes, args, device)
    print(f'[{len(results)} measurements in {time.perf_counter() - start:.1f} s]',
          file=sys.stderr, flush=True)
    markdown = report(results, args, argv, device, shapes, load)
    print(markdown)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(markdown)
        plot(points_from_results(results, device), Path(args.out).with_suffix('.png'))
    return markdown
