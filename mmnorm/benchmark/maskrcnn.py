"""One training iteration of torchvision's Mask R-CNN R-50-FPN per normalization
method (METHODS), eager and with the backbone + FPN compiled: what
tools/benchmark_maskrcnn.py measures (how: docs/benchmarks.md). ``--smoke``
runs the same code on tiny inputs, compiling with 'aot_eager'."""
import datetime
import gc
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch
from torch import nn

from ..studies.results import markdown_table
from ..surgery.compile import keep_cbn_convs_eager
from ..surgery.convert import convert
from . import common
from .common import fmt_ratio, ratio

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
    """Returns the Mask R-CNN of ``method``, on the CPU: what ``maskrcnn_resnet50_fpn``
    builds (which ignores ``norm_layer``), frozen BN as torchvision ships it for
    pretrained training (stem and layer1 frozen), the others from the BN model."""
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


def make_inputs(count, image_size, device):
    """Returns ``count`` random images of ``image_size`` (H, W) and their targets."""
    generator = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(count):
        images.append(torch.rand(3, *image_size, generator=generator).to(device))
        boxes, masks = common.boxes_and_masks(BOXES, image_size, generator)
        labels = torch.randint(1, 91, (BOXES,), generator=generator)
        targets.append({'boxes': boxes.to(device), 'labels': labels.to(device),
                        'masks': masks.to(device)})
    return images, targets


def timed(step, warmup, iters, device, problems, label):
    """``warmup`` calls of ``step``, then ``iters`` timed ones; the names of
    the losses that were not finite go to ``problems`` after ``label``.
    Returns (median seconds, peak bytes or None on the CPU)."""
    sync = common.synchronizer(device)
    for _ in range(warmup):
        step()
    sync()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    seconds, not_finite = [], set()
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        losses = step()
        sync()
        seconds.append(time.perf_counter() - start)
        not_finite |= {name for name, loss in losses.items() if not loss.isfinite().all()}
    if not_finite:
        problems.append(f'{label}loss not finite: {", ".join(sorted(not_finite))}')
    peak = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else None
    return statistics.median(seconds), peak


@dataclass
class Result:
    """The measurements of one method."""
    method: str
    layers: str = ''
    eager: float | None = None  # median seconds
    peak: int | None = None  # bytes
    compiled: float | None = None
    problems: list = field(default_factory=list)


def measure(method, inputs, args, device, compile_backend):
    """Measure ``method`` (``compile_backend`` None: no compiled column).
    Returns its Result; a failure is one of its problems."""
    result, stage = Result(method), ''
    try:
        torch.manual_seed(0)
        model = build_model(method, args.image_size).to(device).train()
        trunk = [type(m).__name__ for m in model.backbone.body.modules()
                 if not list(m.children()) and list(m.parameters()) + list(m.buffers())]
        result.layers = ', '.join(f'{trunk.count(name)} {name}' for name in dict.fromkeys(trunk))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                    lr=LR, momentum=MOMENTUM)

        def step():  # one training iteration; returns its losses, detached
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=args.dtype == 'bfloat16'):
                losses = model(*inputs)
            sum(losses.values()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return {name: loss.detach() for name, loss in losses.items()}

        result.eager, result.peak = timed(step, max(args.warmup, common.steps_to_fill(model)),
                                          args.iters, device, result.problems, '')
        common.check_history_full(model)
        if compile_backend is not None:
            stage = 'compiled '
            torch.compiler.reset()
            keep_cbn_convs_eager(model)
            model.backbone = torch.compile(model.backbone, backend=compile_backend)
            start = time.perf_counter()
            step()
            common.synchronizer(device)()
            common.say(f'[{method}: backbone compiled ({compile_backend}) in '
                       f'{time.perf_counter() - start:.1f} s]')
            result.compiled, _ = timed(step, args.warmup, args.iters, device, result.problems,
                                       stage)
    except Exception as exc:  # noqa: BLE001  (a failing method is a row: CBN is being reworked)
        traceback.print_exc(file=sys.stderr)
        result.problems.append(f'{stage}failed: {common.describe_error(exc)}')
    return result


def table(results, compiled_methods):
    """Returns the result table's markdown (``results[0]`` is 'frozen BN')."""
    base = results[0]
    rows = []
    for r in results:
        compiled = common.fmt_ms(r.compiled) if r.compiled is not None else (
            '-' if r.method in compiled_methods else 'not run')
        rows.append([r.method, r.layers or '-',
                     common.fmt_ms(r.eager) if r.eager is not None else '-',
                     fmt_ratio(ratio(r.eager, base.eager)),
                     common.fmt_mb(r.peak) if r.peak is not None else 'n/a', compiled,
                     fmt_ratio(ratio(r.compiled, base.compiled)), '; '.join(r.problems) or 'ok'])
    return markdown_table(['method', 'ResNet trunk layers', 'iteration ms', 'x frozen BN',
                           'peak MB', 'compiled ms', 'compiled x frozen BN', 'status'], rows)


def report(results, args, argv, device, compile_backend, compiled_methods):
    """Returns the lines of the run's markdown: when, where, what, and the table."""
    import torchvision
    when = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
    name = (torch.cuda.get_device_name(device) if device.type == 'cuda' else
            f'CPU ({platform.machine()}), {torch.get_num_threads()} threads')
    compiled = (f'`keep_cbn_convs_eager(model)`, `model.backbone = torch.compile(model.backbone, '
                f'backend={compile_backend!r})`, then the same warm-up and timed iterations'
                if compile_backend else 'not run')
    return [
        '# Mask R-CNN R-50-FPN (torchvision): one training iteration per normalization method',
        '',
        f'Measured on {when} with `python tools/benchmark_maskrcnn.py {" ".join(argv)}`'
        + (' (smoke mode: tiny inputs, not a benchmark).' if args.smoke else '.'),
        '',
        f'- device: {name}; NVIDIA driver {common.driver_version()}',
        f'- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN '
        f'{torch.backends.cudnn.version()}, torchvision {torchvision.__version__}',
        f'- input: {args.images} images of {args.image_size[0]} x {args.image_size[1]}, '
        f'{args.dtype}; {args.warmup} warm-up iterations (CBN: at least until its history is '
        f'full), median of {args.iters} timed iterations; SGD lr {LR}, momentum {MOMENTUM}',
        f'- compiled: {compiled}',
        '',
        *table(results, compiled_methods).splitlines(),
    ]


def run(args, argv):
    """Measure as tools/benchmark_maskrcnn.py's ``args`` (parsed from ``argv``)
    ask. Returns the markdown, printed (and written to ``args.out`` if given)."""
    if args.smoke:
        args.__dict__.update(SMOKE)
    device = torch.device(args.device)
    backend = 'aot_eager' if args.smoke else 'inductor'
    compiled_methods = [FROZEN] + args.compile_methods if args.compile else []
    inputs = make_inputs(args.images, args.image_size, device)
    results = []
    for method in [FROZEN] + [m for m in args.methods if m != FROZEN]:
        start = time.perf_counter()
        results.append(measure(method, inputs, args, device,
                               backend if method in compiled_methods else None))
        common.say(f'[{method}: {time.perf_counter() - start:.1f} s, '
                   f'{"; ".join(results[-1].problems) or "ok"}]')
        gc.collect()
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return common.publish(report(results, args, argv, device, backend if args.compile else None,
                                 compiled_methods), args.out)
