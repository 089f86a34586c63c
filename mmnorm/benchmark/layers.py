"""Speed and memory of mmnorm's layers, each next to its baseline (ROWS), at
four Mask R-CNN shapes (six with ``--shapes detection``), per dtype and memory
format: what tools/benchmark_layers.py measures and writes (how:
docs/benchmarks.md)."""
import contextlib
import functools
import itertools
import math
import os
import sys
import time
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..layers import BRN, CBN, MABN, CenConv, WSConv, ahead_of_time
from ..layers.launching import LAUNCHES
from ..studies.results import markdown_table
from ..surgery.compile import keep_cbn_convs_eager
from . import common
from .common import fmt_mb, fmt_ms, fmt_ratio, ratio

IMAGE = (800, 1333)  # MMDetection's 1x test/train scale
MIN_TIME = {'cpu': 1.0, 'cuda': 0.05}  # the default --min-time per device type
DTYPES = ('float32', 'bfloat16')
MEMORY_FORMATS = {'contiguous': torch.contiguous_format, 'channels_last': torch.channels_last}
COMPILE_WARMUP = 2  # at least this many warm-up calls of a compiled module
MAX_COMPILE_WARMUP = 20  # at most this many (dynamo's recompile limit is 8 per frame)
PLOTTED = ('fwd+bwd', 'eval')


#: Where in Mask R-CNN a norm runs: its input size (N, C, H, W), and the in_channels
#: and kernel size of the conv before it in the conv rows (padding kernel // 2 keeps H, W)
Shape = namedtuple('Shape', 'name size conv_in kernel')


#: The shapes of each ``--shapes`` choice, by name: 'default' the four of
#: docs/benchmarks.md; 'detection' adds the stem's output and the res5 stage
#: (2048 channels), the detector's other activations a norm sees.
SHAPE_SETS = {
    'default': ('res2 stage', 'FPN P3', 'box head', 'mask head'),
    'detection': ('res2 stage', 'stem', 'FPN P3', 'res5 stage', 'box head', 'mask head'),
}


def make_shapes(scale, which='default'):
    """Returns the shapes of SHAPE_SETS[``which``] for 2 images of IMAGE, the
    sides times ``scale``, the RoI counts times its square (docs/benchmarks.md).
    The conv in front of each norm keeps H and W (padding kernel // 2): the
    stem's is its 7x7 conv from the 3 image channels, res2's and res5's the
    bottleneck's last 1x1 conv, the others 3x3 convs from 256 channels."""
    h, w = common.padded_size(IMAGE, scale)
    shapes = [Shape('res2 stage', (2, 256, h // 4, w // 4), 64, 1),
              Shape('stem', (2, 64, h // 2, w // 2), 3, 7),
              Shape('FPN P3', (2, 256, h // 8, w // 8), 256, 3),
              Shape('res5 stage', (2, 2048, h // 32, w // 32), 512, 1),
              Shape('box head', (common.scaled_count(512, scale), 256, 7, 7), 256, 3),
              Shape('mask head', (common.scaled_count(128, scale), 256, 14, 14), 256, 3)]
    by_name = {shape.name: shape for shape in shapes}
    return [by_name[name] for name in SHAPE_SETS[which]]


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
    """Returns the conv of ``shape`` (a ``cls``), without a bias."""
    return cls(shape.conv_in, shape.size[1], shape.kernel, padding=shape.kernel // 2, bias=False)


def norm(cls, *args):
    """Returns a builder of ``cls(*args, channels)`` from a Shape."""
    return lambda shape: cls(*args, shape.size[1])


def then(first, second):
    """Returns a builder of ``nn.Sequential(first(shape), second(shape))``."""
    return lambda shape: nn.Sequential(first(shape), second(shape))


bn, gn, frozen_bn = norm(nn.BatchNorm2d), norm(nn.GroupNorm, 32), norm(FrozenBN)
mabn, brn, cbn = norm(MABN), norm(BRN), norm(CBN)
ws_conv, cen_conv = functools.partial(conv, cls=WSConv), functools.partial(conv, cls=CenConv)


class TwoGradCBN(nn.BatchNorm2d):
    """``conv`` + CBN computed as the original CBN code does (docs/benchmarks.md):
    autograd ops, and dmu/dtheta, dnu/dtheta from two ``torch.autograd.grad``
    calls, stored weight-sized; k = ``buffer_num``, burn-in 0, CBN's rho and
    keep rule; in eval mode BatchNorm2d's normalization by the running statistics."""
    HISTORY = ('history_mean', 'history_sqmean', 'history_dmean', 'history_dsqmean',
               'history_weight')

    def __init__(self, conv, buffer_num=3, rho=1.0):
        super().__init__(conv.out_channels)
        self.conv, self.buffer_num, self.rho, self.history_pushes = conv, buffer_num, rho, 0
        c, weight = conv.out_channels, conv.weight.shape
        for key, shape in zip(self.HISTORY, ((c,), (c,), weight, weight, weight)):
            self.register_buffer(key, torch.zeros(buffer_num, *shape))

    def burnin_iters(self):
        """Returns 0: no burn-in."""
        return 0

    def forward(self, x):
        y = self.conv(x)
        if not self.training:
            return super().forward(y)
        theta = self.conv.weight
        mu_t, nu_t = y.mean((0, 2, 3)), y.square().mean((0, 2, 3))
        # mu_c depends on theta[c] only: the gradient of the sum is per channel.
        dmu, dnu = (torch.autograd.grad(m.sum(), theta, retain_graph=True)[0] for m in (mu_t, nu_t))
        mu_sum, nu_sum, count = mu_t, nu_t, 1
        for s in range(min(self.history_pushes, self.buffer_num)):
            delta = theta.detach() - self.history_weight[s]
            mu = self.history_mean[s] + self.rho * (self.history_dmean[s] * delta).sum((1, 2, 3))
            nu = self.history_sqmean[s] + self.rho * (self.history_dsqmean[s] * delta).sum(
                (1, 2, 3))
            keep = nu - mu.square() >= 0
            mu_sum, nu_sum = mu_sum + torch.where(keep, mu, 0), nu_sum + torch.where(keep, nu, 0)
            count = count + keep
        mu = mu_sum / count
        sigma2 = (nu_sum / count - mu.square()).clamp_min(0)
        shape = (1, -1, 1, 1)
        out = ((y - mu.view(shape)) * (sigma2 + self.eps).rsqrt().view(shape)
               * self.weight.view(shape) + self.bias.view(shape))
        with torch.no_grad():
            for key, value in zip(self.HISTORY, (mu_t, nu_t, dmu, dnu, theta)):
                getattr(self, key)[self.history_pushes % self.buffer_num] = value
            self.history_pushes += 1
            n = y.numel() // y.size(1)
            self.running_mean.lerp_(mu_t, self.momentum)
            self.running_var.lerp_((nu_t - mu_t.square()) * (n / max(n - 1, 1)), self.momentum)
        return out


@dataclass(frozen=True)
class Row:
    """A layer and its baseline: builders of both from a ``Shape``."""
    name: str
    baseline: str
    build: Callable
    build_baseline: Callable
    conv_input: bool = False  # the input is the conv's (conv_in channels)
    option: str = ''  # the --layers name, when ``name`` is shared with another row

    @property
    def key(self):
        """Returns the row's --layers name."""
        return self.option or self.name


ROWS = [
    Row('MABN', 'BN', mabn, bn),
    Row('BRN', 'BN', brn, bn),
    Row('GN', 'BN', gn, bn),
    Row('FrozenBN', 'BN', frozen_bn, bn),
    Row('Conv+CBN', 'Conv+BN', then(conv, cbn), then(conv, bn), conv_input=True),
    Row('Conv+CBN', 'Conv+CBN(autograd.grad)', then(conv, cbn),
        lambda shape: TwoGradCBN(conv(shape)), conv_input=True, option='Conv+CBN-vs-grad'),
    Row('WSConv+GN', 'Conv+GN', then(ws_conv, gn), then(conv, gn), conv_input=True),
    Row('CenConv+MABN', 'Conv+BN', then(cen_conv, mabn), then(conv, bn), conv_input=True),
    Row('WSConv', 'Conv', ws_conv, conv, conv_input=True),
    Row('CenConv', 'Conv', cen_conv, conv, conv_input=True),
]


def forward_context(device, dtype):
    """Returns a maker of the context the forwards run in: ``torch.autocast``
    to bfloat16 for 'bfloat16', nothing for 'float32'."""
    if dtype == 'float32':
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=getattr(torch, dtype))


def incoming_grad(grad):
    """Returns ``grad_for(y)``: the fixed incoming gradient ``grad`` in the
    dtype of the output ``y`` (bfloat16 under autocast), cast once per dtype."""
    cache = {grad.dtype: grad}

    def grad_for(y):
        if y.dtype not in cache:
            cache[y.dtype] = grad.to(y.dtype)
        return cache[y.dtype]
    return grad_for


def train_step(module, x, grad_for, sync, context):
    """One training step of ``module`` (the forward in ``context()``).
    Returns (forward seconds, forward+backward seconds)."""
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
        """Returns the operators dispatched plus the Triton launches so far."""
        return self.dispatched + LAUNCHES.count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.dispatched += 1
        return func(*args, **(kwargs or {}))


#: The modules whose ``launch`` :func:`launch_grids` wraps
TRITON_MODULES = tuple(f'{ahead_of_time.__package__}.{name}.kernels'
                       for name in ahead_of_time.KERNEL_MODULES)


@contextlib.contextmanager
def launch_grids(grids=None):
    """Yields a list (``grids``, if given) that gets the grid (a tuple) of
    every Triton launch meanwhile: the ``launch`` name of each
    ``mmnorm.layers.*.kernels`` module imported so far (the modules import
    it by name from ``mmnorm.layers.launching``) is wrapped, and restored
    after. A module is imported at its layers' first fused step, before any
    measured one (the warm-up, the first-use check)."""
    grids = [] if grids is None else grids
    modules = [sys.modules[name] for name in TRITON_MODULES if name in sys.modules]
    originals = [module.launch for module in modules]

    def wrap(launch):
        def recorded(kernel, grid, *args, **constants):
            grids.append(tuple(grid))
            return launch(kernel, grid, *args, **constants)
        return recorded

    for module, launch in zip(modules, originals):
        module.launch = wrap(launch)
    try:
        yield grids
    finally:
        for module, launch in zip(modules, originals):
            module.launch = launch


def fewest_programs(grids):
    """Returns the smallest number of programs of the launches' ``grids``
    (the product of a grid's sizes), or None for no launch."""
    return min((math.prod(grid) for grid in grids), default=None)


def ops_per_step(module, x, grad_for, context, grids=None):
    """Returns the operators and Triton launches of the :func:`train_step` of
    ``module`` (see :class:`OpCounter`): (forward, backward), read at the
    step's synchronisation points. The grid of each Triton launch of the step
    is appended to the list ``grids``, if given (:func:`launch_grids`)."""
    recording = launch_grids(grids) if grids is not None else contextlib.nullcontext()
    with OpCounter() as counter, recording:
        marks = []
        train_step(module, x, grad_for, lambda: marks.append(counter.count), context)
    start, middle, end = marks
    return middle - start, end - middle


def eval_step(module, x, sync, context):
    """One eval-mode forward without autograd, in ``context()``. Returns (seconds,)."""
    sync()
    start = time.perf_counter()
    with torch.no_grad(), context():
        module(x)
    sync()
    return (time.perf_counter() - start,)


def memory_bytes(module, x, grad_for, device, context):
    """Returns the memory of one training step in bytes: on CUDA the peak of
    ``max_memory_allocated`` above what was allocated before; on the CPU (no
    peak counter) the distinct storages autograd saves for backward plus the
    output, the module's parameters and buffers left out."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    if device.type == 'cuda':
        sync = common.synchronizer(device)
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        train_step(module, x, grad_for, sync, context)
        return torch.cuda.max_memory_allocated(device) - before
    resident = {t.untyped_storage().data_ptr()
                for t in itertools.chain(module.parameters(), module.buffers())}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in resident:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), context():
        y = module(x)
    pack(y).backward(grad_for(y))
    return sum(storages.values())


def history_bytes(module):
    """Returns the bytes of the CBN history rings in ``module`` (``history_*``
    buffers; CBN's 0-d push counter left out)."""
    return sum(b.nbytes for name, b in module.named_buffers()
               if name.rsplit('.', 1)[-1].startswith('history_') and b.dim() > 0)


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


def frames_compiled():
    """Returns how many frames torch.compile (dynamo) has compiled in this process."""
    from torch._dynamo.utils import counters
    return counters['frames']['ok']


def compiled_times(modules, step, args):
    """Time ``step`` (fwd+bwd) of ``torch.compile(module)`` of both modules (in
    training mode), compiled afresh (static shapes) in their warm-up: at least
    COMPILE_WARMUP calls, more until a call compiles nothing (at most
    MAX_COMPILE_WARMUP). Returns ((layer, baseline) median seconds, a note on
    frames compiled while timed or ''), or ((), a short error) on a failure."""
    torch.compiler.reset()  # no compiled code of another row or shape: static shapes, no limit
    compiled = []
    try:
        for side, module in zip(('layer', 'baseline'), modules):
            keep_cbn_convs_eager(module)  # a CBN's conv runs outside the graph with it
            compiled.append(torch.compile(module, backend=args.compile_backend))
            for call in range(MAX_COMPILE_WARMUP):
                before = frames_compiled()
                step(compiled[-1])
                if call + 1 >= max(args.warmup, COMPILE_WARMUP) and frames_compiled() == before:
                    break
        side = 'timing'
        before = frames_compiled()
        times = common.median_times(compiled, step, [0, 0], args.repeats, args.min_time)
    except Exception as exc:  # noqa: BLE001  (a layer that does not compile yet is a cell)
        return (), f'{side}: {common.describe_error(exc, 120)}'
    recompiled = frames_compiled() - before
    return (tuple(fwd_bwd for _, fwd_bwd in times),
            f'compiled {recompiled} frames while timed' if recompiled else '')


def measure(row, shape, args, device, dtype='float32', memory_format='contiguous'):
    """Measure ``row`` at ``shape`` in ``dtype`` and ``memory_format``
    (docs/benchmarks.md). Returns its Result; an exception becomes ``Result.error``."""
    result = Result(row, shape, dtype, memory_format)
    try:
        torch.manual_seed(0)
        fmt = MEMORY_FORMATS[memory_format]
        modules = [build(shape).to(device, memory_format=fmt).train()
                   for build in (row.build, row.build_baseline)]
        n, c, h, w = shape.size
        x = torch.randn(n, shape.conv_in if row.conv_input else c, h, w, device=device)
        x = x.contiguous(memory_format=fmt).requires_grad_()
        grad_for = incoming_grad(torch.randn(shape.size, device=device).contiguous(
            memory_format=fmt))
        sync, context = common.synchronizer(device), forward_context(device, dtype)
        train = functools.partial(train_step, x=x, grad_for=grad_for, sync=sync, context=context)
        warmups = [max(args.warmup, common.steps_to_fill(module)) for module in modules]
        trains = common.median_times(modules, train, warmups, args.repeats, args.min_time)
        for module in modules:
            common.check_history_full(module)
        memory = [memory_bytes(module, x, grad_for, device, context) for module in modules]
        grids = [[], []]
        ops = [ops_per_step(module, x, grad_for, context, launched)
               for module, launched in zip(modules, grids)]
        if args.compile:
            result.compiled, result.compile_note = compiled_times(modules, train, args)
        for module in modules:
            module.eval()
        evals = common.median_times(modules, lambda m: eval_step(m, x, sync, context),
                                    [args.warmup] * 2, args.repeats, args.min_time)
        for i, side in enumerate((result.layer, result.baseline)):
            side.update({'fwd': trains[i][0], 'fwd+bwd': trains[i][1], 'eval': evals[i][0],
                         'memory': memory[i], 'ops': ops[i], 'programs': fewest_programs(grids[i]),
                         'history': history_bytes(modules[i]),
                         'buffers': sum(b.nbytes for b in modules[i].buffers())})
    # One failing layer (e.g. cbn.py mid-edit) must not stop the run: it becomes a row.
    except Exception as exc:  # noqa: BLE001
        result.error = common.describe_error(exc, 300)
    return result


OPS_COLUMN = 'ops + launches fwd+bwd (layer / base)'
#: The fewest programs a Triton launch of one training step starts ('-': no launch)
PROGRAMS_COLUMN = 'min programs per launch (layer / base)'
COMPILED_COLUMNS = ('compiled fwd+bwd ms (layer / base)', 'layer compiled / eager x',
                    'compiled fwd+bwd x')


def compiled_cells(result):
    """Returns the cells of COMPILED_COLUMNS: the compiled fwd+bwd times, the
    layer's compiled / eager ratio and the compiled layer / compiled baseline ratio."""
    if not result.compiled:
        return [f'compile failed: {result.compile_note}', '', '']
    layer, base = result.compiled
    note = f' ({result.compile_note})' if result.compile_note else ''
    return [f'{fmt_ms(layer)} / {fmt_ms(base)}{note}',
            fmt_ratio(ratio(layer, result.layer['fwd+bwd'])), fmt_ratio(ratio(layer, base))]


def programs_cell(sides):
    """Returns the PROGRAMS_COLUMN cell of (layer, baseline) measurements:
    each side's fewest programs per launch or '-', one '-' if neither launched."""
    cells = ['-' if side['programs'] is None else str(side['programs']) for side in sides]
    return ' / '.join(cells) if cells != ['-', '-'] else '-'


def table(results, device, compiled=False):
    """Returns the main table's lines: one row per result (with
    COMPILED_COLUMNS if ``compiled``)."""
    memory = 'peak memory' if device.type == 'cuda' else 'saved for backward + output'
    header = ['layer', 'baseline', 'shape', 'dtype', 'memory format', 'fwd ms (layer / base)',
              'fwd x', 'fwd+bwd ms (layer / base)', 'fwd+bwd x', OPS_COLUMN, PROGRAMS_COLUMN,
              'eval ms (layer / base)', 'eval x', f'{memory} MB (layer / base)', 'memory x',
              'buffers MB (layer / base)', 'CBN history MB (layer / base)',
              *(COMPILED_COLUMNS if compiled else ())]
    rows = []
    for r in results:
        cells = [r.row.name, r.row.baseline, f'{r.shape.name} {"x".join(map(str, r.shape.size))}',
                 r.dtype, r.memory_format]
        if r.error:
            rows.append(common.not_measured(cells, r.error, len(header)))
            continue
        sides = (r.layer, r.baseline)
        for metric, fmt in (('fwd', fmt_ms), ('fwd+bwd', fmt_ms), ('eval', fmt_ms),
                            ('memory', fmt_mb), ('buffers', fmt_mb)):
            cells.append(' / '.join(fmt(side[metric]) for side in sides))
            if metric != 'buffers':
                cells.append(fmt_ratio(ratio(r.layer[metric], r.baseline[metric])))
            if metric == 'fwd+bwd':
                cells.append(' / '.join('{}+{}'.format(*side['ops']) for side in sides))
                cells.append(programs_cell(sides))
        history = [fmt_mb(side['history']) if side['history'] else '-' for side in sides]
        cells.append(' / '.join(history) if history != ['-', '-'] else '-')
        rows.append(cells + (compiled_cells(r) if compiled else []))
    return markdown_table(header, rows).splitlines()


def device_text(device):
    """Returns the device as the report's settings name it: on CUDA the GPU,
    driver, CUDA and cuDNN versions and the date; on the CPU the thread count."""
    if device.type != 'cuda':
        return f'device {device}, {torch.get_num_threads()} threads'
    return (f'device {device} ({torch.cuda.get_device_name(device)}, driver '
            f'{common.driver_version()}, CUDA {torch.version.cuda}, cuDNN '
            f'{torch.backends.cudnn.version()}), measured {time.strftime("%Y-%m-%d")}')


def report(results, args, argv, device, shapes, load):
    """Returns the lines of the run's markdown: its settings and the table."""
    return [
        '# Layer benchmark: mmnorm layers next to their baselines',
        '',
        f'Command: `{" ".join(["python tools/benchmark_layers.py", *argv])}`  ',
        f'torch {torch.__version__}, {device_text(device)}, scale {args.scale}, load average '
        f'{load} on {os.cpu_count()} CPUs at the start; each time is the median of at least '
        f'{args.repeats} alternated samples and {args.min_time} s per module and mode, after '
        f'{args.warmup} warm-up calls.',
        '',
        'Shapes (2 images per batch; `--scale 1` is an 800x1333 image, 512 and 128 RoIs):',
        '',
        *[f'- {s.name}: norm input {s.size}; conv {s.kernel}x{s.kernel} {s.conv_in} -> '
          f'{s.size[1]}' for s in shapes],
        '',
        'Ratios are layer / baseline at the same shape, measured alternately in this run; '
        'how each column is measured: docs/benchmarks.md. Min programs per launch: the '
        'smallest grid (programs) of the Triton launches of one training step, - where the '
        'step launched none (the ATen path). dtype bfloat16: the forwards under '
        f'torch.autocast(\'{device.type}\', dtype=torch.bfloat16).'
        + (f' Compiled: torch.compile(module, backend=\'{args.compile_backend}\'), at least '
           f'{max(args.warmup, COMPILE_WARMUP)} warm-up calls, more until a call compiles '
           f'nothing (at most {MAX_COMPILE_WARMUP}).' if args.compile else ''),
        '',
        *table(results, device, args.compile),
    ]


def points_from_markdown(markdown):
    """Returns (group label, shape name, {metric: ratio}) per measured row of
    the main table (the one with a 'shape' column) of ``report``'s markdown;
    a group is a row in one dtype and memory format."""
    return [(f'{r["layer"]}\nvs {r["baseline"]}\n{r["dtype"]}\n{r["memory format"]}',
             r['shape'].rsplit(' ', 1)[0], {m: common.read_ratio(r[f'{m} x']) for m in PLOTTED})
            for r in common.find_table(markdown, ('shape', 'dtype', 'memory format'))
            if not r['fwd ms (layer / base)'].startswith('not measured')]


def plot(markdown, path):
    """Write to ``path`` the bars of the fwd+bwd and eval ratios in the table
    of ``markdown``: a group per row in one dtype and memory format, a bar per shape."""
    points = points_from_markdown(markdown)
    groups = list(dict.fromkeys(label for label, _, _ in points))
    shapes = list(dict.fromkeys(shape for _, shape, _ in points))
    ratios = {(label, shape): values for label, shape, values in points}
    panels = [(f'{metric}: layer / baseline',
               {shape: [ratios.get((group, shape), {}).get(metric, float('nan'))
                        for group in groups] for shape in shapes}) for metric in PLOTTED]
    common.plot_bars(path, 'mmnorm layers next to their baselines (ratios of median times)',
                     groups, panels)


def run(args, argv):
    """Run the benchmark as tools/benchmark_layers.py's options ``args``
    (parsed from ``argv``) ask. Returns the markdown, printed (None with
    --plot-from)."""
    if args.plot_from:
        return common.redraw(args.plot_from, plot)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, load = torch.device(args.device), common.load_average()
    shapes = make_shapes(args.scale, args.shapes)
    rows = [row for row in ROWS if not args.layers or row.key in args.layers]
    results, start = [], time.perf_counter()
    for dtype, memory_format, row, shape in itertools.product(args.dtype, args.memory_format,
                                                              rows, shapes):
        began = time.perf_counter()
        results.append(measure(row, shape, args, device, dtype, memory_format))
        common.say(f'[{row.key} @ {shape.name}, {dtype}, {memory_format}: '
                   f'{time.perf_counter() - began:.1f} s, '
                   f'{results[-1].error or results[-1].compile_note or "ok"}]')
    common.say(f'[{len(results)} measurements in {time.perf_counter() - start:.1f} s]')
    return common.publish(report(results, args, argv, device, shapes, load), args.out, plot)
