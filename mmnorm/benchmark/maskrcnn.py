"""One training iteration of torchvision's Mask R-CNN R-50-FPN per normalization
method: what tools/benchmark_maskrcnn.py measures (torch, torchvision, mmengine;
no mmcv, no mmdet).

Every model is ``MaskRCNN(resnet_fpn_backbone(backbone_name='resnet50',
weights=None, norm_layer=..., trainable_layers=...), num_classes=91)``, what
``maskrcnn_resnet50_fpn`` builds (which ignores ``norm_layer`` and, without
weights, ``trainable_backbone_layers``), seeded alike, no weights loaded:

* 'frozen BN': as torchvision ships it for pretrained training:
  ``FrozenBatchNorm2d``, trainable_layers=3 (stem and layer1 frozen);
* 'BN': ``nn.BatchNorm2d``, all layers trainable. The others are this model
  after ``mmnorm.convert``: 'MABN + CenConv'; 'BRN' and 'CBN' with
  ``conv=None`` (convert's default conv is CenConv); 'GN + WS' with
  ``nn.GroupNorm`` (32 groups; the class itself, so no mmcv) and WSConv.

Only the ResNet trunk has norms: torchvision's v1 FPN, box head (TwoMLPHead)
and mask head have none. The transform's min/max size is the input's, so
nothing is resized (at 800 x 1333 these are torchvision's defaults).

Inputs: ``--images`` random images (seed 0), 3 random boxes each with labels
and uint8 box masks of the image size. An iteration, in train mode: forward
with the targets (in bfloat16 autocast with ``--dtype bfloat16``), sum of the
losses, backward, SGD step (lr 1e-4, momentum 0.9), zero_grad. Per method:
``--warmup`` iterations (CBN: at least until its history is full, checked),
then ``--iters`` timed ones (synchronized on CUDA): their median, its ratio to
'frozen BN' (always measured), the peak ``torch.cuda.max_memory_allocated``
(reset before them; n/a on the CPU), and whether every loss stayed finite.
Compiled: the same after ``keep_cbn_convs_eager(model)`` (a no-op without CBN)
and ``model.backbone = torch.compile(model.backbone)`` (backbone + FPN, static
shapes at a fixed input size; the RPN and RoI heads have data-dependent shapes
and stay eager); the first, compiling, iteration is timed to stderr. An
error becomes the row's status (traceback to stderr), never the end of the
run. ``--smoke`` runs the same code on tiny inputs, compiling with 'aot_eager'
instead of inductor.
"""
import datetime
import gc
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..studies.results import markdown_table
from ..surgery.compile import keep_cbn_convs_eager
from ..surgery.convert import convert
from .layers import check_history_full, driver_version, fmt_mb, fmt_ms, steps_to_fill

FROZEN = 'frozen BN'
#: method -> the ``mmnorm.convert`` arguments applied to the BN model (None: none).
METHODS = {
    FROZEN: None,
    'BN': None,
    'MABN + CenConv': dict(norm=dict(type='MABN'), conv=dict(type='CenConv')),
    'BRN': dict(norm=dict(type='BRN'), conv=None),
    'CBN': dict(norm=dict(type='CBN'), conv=None),
    'GN + WS': dict(norm=dict(type=nn.GroupNorm, num_groups=32), conv=dict(type='WSConv')),
}
SMOKE = dict(image_size=[128, 160], images=2, warmup=1, iters=1)
LR, MOMENTUM, BOXES = 1e-4, 0.9, 3


def build_model(method, image_size):
    """The Mask R-CNN of ``method`` (module docstring), on the CPU."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d
    frozen = method == FROZEN
    backbone = resnet_fpn_backbone(backbone_name='resnet50', weights=None,
                                   norm_layer=FrozenBatchNorm2d if frozen else nn.BatchNorm2d,
                                   trainable_layers=3 if frozen else 5)
    model = MaskRCNN(backbone, num_classes=91, min_size=min(image_size),
                     max_size=max(image_size))
    if METHODS[method] is not None:
        convert(model, **METHODS[method])
    return model


def trunk_layers(model):
    """The ResNet trunk's layers with weights or buffers, counted by class."""
    names = [type(m).__name__ for m in model.backbone.body.modules()
             if not list(m.children()) and list(m.parameters()) + list(m.buffers())]
    return ', '.join(f'{names.count(name)} {name}' for name in dict.fromkeys(names))


def make_inputs(count, image_size, device):
    """``count`` random images of ``image_size`` (H, W) and their targets."""
    generator = torch.Generator().manual_seed(0)
    h, w = image_size
    scale = torch.tensor([w, h])
    images, targets = [], []
    for _ in range(count):
        images.append(torch.rand(3, h, w, generator=generator).to(device))
        sizes = (0.1 + 0.4 * torch.rand(BOXES, 2, generator=generator)) * scale
        corners = torch.rand(BOXES, 2, generator=generator) * (scale - sizes)
        boxes = torch.cat([corners, corners + sizes], 1).floor()
        masks = torch.zeros(BOXES, h, w, dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            mask[y0:y1, x0:x1] = 1
        labels = torch.randint(1, 91, (BOXES,), generator=generator)
        targets.append({'boxes': boxes.to(device), 'labels': labels.to(device),
                        'masks': masks.to(device)})
    return images, targets


def iteration(model, optimizer, images, targets, dtype):
    """One training iteration; returns the losses, detached."""
    with torch.autocast(images[0].device.type, dtype=torch.bfloat16,
                        enabled=dtype == 'bfloat16'):
        losses = model(images, targets)
    sum(losses.values()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {name: loss.detach() for name, loss in losses.items()}


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(step, warmup, iters, device):
    """``warmup`` calls of ``step``, then ``iters`` timed ones: (median seconds,
    peak bytes or None on the CPU, names of the losses that were not finite)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    seconds, not_finite = [], set()
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        losses = step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        not_finite |= {name for name, loss in losses.items() if not loss.isfinite().all()}
    peak = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else None
    return statistics.median(seconds), peak, sorted(not_finite)


def one_line(exc):
    """``exc`` as a short table cell: its first line, and the next one when
    the first announces it (``backend='inductor' raised:``). The traceback
    goes to stderr."""
    traceback.print_exc(file=sys.stderr)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or ['']
    text = ' '.join(lines[:2]) if lines[0].endswith(':') else lines[0]
    return f'{type(exc).__name__}: {text}'.replace('|', '/')[:200]


@dataclass
class Result:
    method: str
    layers: str = ''
    eager: float | None = None  # median seconds
    peak: int | None = None  # bytes
    compiled: float | None = None
    problems: list = field(default_factory=list)


def measure(method, inputs, args, device, compile_backend):
    """Measure ``method`` (``compile_backend`` None: no compiled column)."""
    result = Result(method)
    try:
        torch.manual_seed(0)
        model = build_model(method, args.image_size).to(device).train()
        result.layers = trunk_layers(model)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                    lr=LR, momentum=MOMENTUM)

        def step():
            return iteration(model, optimizer, *inputs, args.dtype)

        result.eager, result.peak, not_finite = timed(
            step, max(args.warmup, steps_to_fill(model)), args.iters, device)
        check_history_full(model)
    except Exception as exc:  # noqa: BLE001  (a failing method is a row: CBN is being reworked)
        result.problems.append(f'failed: {one_line(exc)}')
        return result
    if not_finite:
        result.problems.append(f'loss not finite: {", ".join(not_finite)}')
    if compile_backend is None:
        return result
    try:
        torch.compiler.reset()
        keep_cbn_convs_eager(model)
        model.backbone = torch.compile(model.backbone, backend=compile_backend)
        start = time.perf_counter()
        step()
        synchronize(device)
        print(f'[{method}: backbone compiled ({compile_backend}) in '
              f'{time.perf_counter() - start:.1f} s]', file=sys.stderr, flush=True)
        result.compiled, _, not_finite = timed(step, args.warmup, args.iters, device)
    except Exception as exc:  # noqa: BLE001
        result.problems.append(f'compiled failed: {one_line(exc)}')
        return result
    if not_finite:
        result.problems.append(f'compiled loss not finite: {", ".join(not_finite)}')
    return result


def ratio(value, base):
    return f'{value / base:.2f}x' if value is not None and base is not None else '-'


def table(results, compiled_methods):
    """The result table's markdown (``results[0]`` is 'frozen BN')."""
    base = results[0]
    rows = []
    for r in results:
        compiled = fmt_ms(r.compiled) if r.compiled is not None else (
            '-' if r.method in compiled_methods else 'not run')
        rows.append([r.method, r.layers or '-', fmt_ms(r.eager) if r.eager is not None else '-',
                     ratio(r.eager, base.eager),
                     fmt_mb(r.peak) if r.peak is not None else 'n/a', compiled,
                     ratio(r.compiled, base.compiled), '; '.join(r.problems) or 'ok'])
    return markdown_table(['method', 'ResNet trunk layers', 'iteration ms', 'x frozen BN',
                           'peak MB', 'compiled ms', 'compiled x frozen BN', 'status'], rows)


def report(results, args, argv, device, compile_backend, compiled_methods):
    """The markdown of the run: when, where, what, and the table."""
    import torchvision
    when = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
    name = (torch.cuda.get_device_name(device) if device.type == 'cuda' else
            f'CPU ({platform.machine()}), {torch.get_num_threads()} threads')
    h, w = args.image_size
    compiled = ('`keep_cbn_convs_eager(model)`, `model.backbone = torch.compile('
                f'model.backbone, backend={compile_backend!r})` (backbone + FPN; RPN and RoI '
                'heads eager), then the same warm-up and timed iterations'
                if compile_backend else 'not run')
    lines = [
        '# Mask R-CNN R-50-FPN (torchvision): one training iteration per normalization method',
        '',
        f'Measured on {when} with `python tools/benchmark_maskrcnn.py {" ".join(argv)}`'
        + (' (smoke mode: tiny inputs, not a benchmark).' if args.smoke else '.'),
        '',
        f'- device: {name}; NVIDIA driver {driver_version()}',
        f'- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN '
        f'{torch.backends.cudnn.version()}, torchvision {torchvision.__version__}',
        f'- input: {args.images} images of {h} x {w}, {args.dtype}; {args.warmup} warm-up '
        f'iterations (CBN: at least until its history is full), median of {args.iters} '
        'timed iterations',
        '- iteration: forward with targets, sum of the losses, backward, SGD step '
        f'(lr {LR}, momentum {MOMENTUM}), zero_grad; peak MB: torch.cuda.max_memory_allocated '
        'over the timed iterations',
        f'- compiled: {compiled}',
        '',
    ]
    return '\n'.join(lines) + '\n' + table(results, compiled_methods)


def run(args, argv):
    """Measure as tools/benchmark_maskrcnn.py's ``args`` (parsed from ``argv``)
    ask; print the markdown, write it to ``args.out`` if given, return it."""
    if args.smoke:
        args.__dict__.update(SMOKE)
    device = torch.device(args.device)
    backend = 'aot_eager' if args.smoke else 'inductor'
    methods = [FROZEN] + [m for m in args.methods if m != FROZEN]
    compiled_methods = [FROZEN] + args.compile_methods if args.compile else []
    inputs = make_inputs(args.images, args.image_size, device)
    results = []
    for method in methods:
        start = time.perf_counter()
        results.append(measure(method, inputs, args, device,
                               backend if method in compiled_methods else None))
        print(f'[{method}: {time.perf_counter() - start:.1f} s, '
              f'{"; ".join(results[-1].problems) or "ok"}]', file=sys.stderr, flush=True)
        gc.collect()
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    markdown = report(results, args, argv, device, backend if args.compile else None,
                      compiled_methods)
    print(markdown)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(markdown)
    return markdown
