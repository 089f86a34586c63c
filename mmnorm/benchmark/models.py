"""Speed and memory of whole Mask R-CNN R-50-FPN models, one per method, in one run:
what tools/benchmark_models.py measures and writes.

Every model is built from this project's COCO config of its method (no
pretrained weights: ``backbone.init_cfg=None``; MMDetection's own
initialisation otherwise) and fed the same two synthetic images:

* training iteration: ``data_preprocessor`` + loss forward + backward + SGD
  step (each config's ``optim_wrapper``, its lr set to LR, the start of the
  configs' linear warm-up, so that repeated steps on the same images stay
  finite), in train mode; timed as a whole and in three parts (forward up to
  the summed loss, backward, step + zero_grad);
* inference: ``test_step`` (``data_preprocessor`` + predict, rescaled boxes
  and masks) in eval mode under ``torch.no_grad()``, with the detection score
  threshold at 0 so that every model, trained or not, sends its full quota of
  detections (100 per image at scale 1) through the mask head.

Methods (ratios are to 'FrozenBN', always measured):

* FrozenBN: configs/mask_rcnn_frozenbn_1x.py (the CBN paper's baseline: frozen
  BN in the backbone, stem and stage 1 frozen, no norm in the FPN and heads);
* MABN, BN, BRN: configs/mask_rcnn_mabn.py (MABN + CenConv everywhere),
  mask_rcnn_bn_scratch.py, mask_rcnn_brn_scratch.py (the MABN paper's rows:
  the norm in the backbone, FPN and both heads, nothing frozen);
* CBN: configs/mask_rcnn_cbn_1x.py with its burn-in set to 0 iterations, so
  that every timed step is a compensated CBN step over a full history;
* GN+WS: configs/mask_rcnn_gnws_2x.py;
* inference only, for issue 7: 'MABN fused', the MABN model folded by
  ``mmnorm.fuse``, and 'no norm', the MABN model with every norm replaced by
  ``nn.Identity`` and every CenConv by a new ``nn.Conv2d`` with a bias: the
  architecture the fold produces (checked, see ``architecture``), made without
  the fold, and given the folded model's weights (``load_state_dict``,
  strict) so that both compute the same numbers.

Timing: all models are built first; each is warmed up (``--warmup``
iterations, CBN at least burn-in + buffer_num so that its history is full,
checked), then the methods take turns, one iteration each per round
(A, B, C, ..., then C, B, A, ...), for ``--repeats`` rounds, so that load
changes on a shared machine hit every method; each time is the median over
the rounds (``layers.median_times``). Training first, then inference.

Memory (``--measure-memory-of METHOD``, run by the main process in a fresh
subprocess per method): after the model is built and has run one training
iteration (CBN: until its history is full), the resident set size (RSS,
``VmRSS``) is read, the kernel's peak RSS of the process (``VmHWM``) is reset
to it (``/proc/self/clear_refs``), one iteration runs, and the peak minus the RSS
before it is the iteration's memory, in KiB; the same then for inference (eval
mode, one warm-up inference). ``VmHWM`` is what ``getrusage``'s ``ru_maxrss``
reports as long as no thread of the process has exited; after a thread exit
``ru_maxrss`` keeps the process's older peak (the kernel's per-process maximum
is not reset by clear_refs), so it is not used. The subprocess runs with
glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at MMAP_THRESHOLD, so that every
allocation of that size or more (every sizeable tensor) gets its own mapping
and goes back to the system when freed: RSS then follows the live tensors
instead of what the allocator kept from earlier iterations.

With ``--out`` the plot of the ratios (time, and memory when measured) is
written next to the markdown as .png; ``--plot-from`` redraws it from the
table of an earlier run.

``--profile`` (or a missed MABN aim) adds a profile of one training iteration
of FrozenBN, BN and MABN (``torch.profiler``): the self CPU time of every op is
attributed to the innermost module whose forward ran it, and a backward op to
the module whose forward created its autograd node (same sequence number);
the table sums it by model component and by module type.
"""
import copy
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers import CenConv, WSConv
from ..studies.results import markdown_table
from ..surgery.fuse import fuse

from .layers import (check_history_full, describe_error, fmt_ms, load_average, markdown_tables,
                     median_times, padded_size, redraw, scaled_count, steps_to_fill)

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / 'tools' / 'benchmark_models.py'  # its --measure-memory-of runs the subprocess
IMAGE = (512, 832)  # (H, W) at --scale 1, multiples of 32 (the configs' pad size divisor)
LR = 0.02 * 0.001
GT_PER_IMAGE = 3
MMAP_THRESHOLD = 128 * 1024
AIM = ('mabn', 1.15)  # whole-model training iteration within 1.15x of frozen BN
EQUAL_TOLERANCE = 0.05  # fused / no-norm inference counts as equal within this
PROFILED = ('frozenbn', 'bn', 'mabn')
MEMORY_MARK = 'MEMORY_KIB '


# ---------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    key: str  # the --methods name
    name: str
    config: str
    trains: bool = True
    variant: str = ''  # 'fused' or 'no norm': derived from the config's model

    def describe(self):
        extra = {'fused': ', mmnorm.fuse', 'no norm': ', norms -> Identity, CenConv -> Conv2d'}
        return f'{self.config}{extra.get(self.variant, "")}'


METHODS = [
    Method('frozenbn', 'FrozenBN', 'mask_rcnn_frozenbn_1x.py'),
    Method('mabn', 'MABN', 'mask_rcnn_mabn.py'),
    Method('bn', 'BN', 'mask_rcnn_bn_scratch.py'),
    Method('brn', 'BRN', 'mask_rcnn_brn_scratch.py'),
    Method('cbn', 'CBN', 'mask_rcnn_cbn_1x.py'),
    Method('gnws', 'GN+WS', 'mask_rcnn_gnws_2x.py'),
    Method('mabn-fused', 'MABN fused', 'mask_rcnn_mabn.py', trains=False, variant='fused'),
    Method('no-norm', 'no norm', 'mask_rcnn_mabn.py', trains=False, variant='no norm'),
]
BASELINE = 'frozenbn'


def image_size(scale):
    """(H, W) of the benchmark's images at ``scale``."""
    return padded_size(IMAGE, scale)


def without_cbn_burnin(cfg):
    """Set burn-in 0 in every CBN norm config found in ``cfg`` (in place)."""
    if isinstance(cfg, dict):
        if cfg.get('type') == 'CBN':
            cfg.pop('burnin_epochs', None)
            cfg['burnin'] = 0
        for value in cfg.values():
            without_cbn_burnin(value)
    elif isinstance(cfg, (list, tuple)):
        for value in cfg:
            without_cbn_burnin(value)


def model_config(method, scale):
    """``method``'s config with the benchmark's changes (see the module docstring)."""
    from mmengine.config import Config

    from ..engine.runtime import require_pkg_resources
    require_pkg_resources()
    cfg = Config.fromfile(REPO / 'configs' / method.config)
    model = cfg.model
    model.backbone.init_cfg = None
    without_cbn_burnin(model)
    train, test = model.train_cfg, model.test_cfg
    train.rpn_proposal.nms_pre = scaled_count(train.rpn_proposal.nms_pre, scale)
    train.rpn_proposal.max_per_img = scaled_count(train.rpn_proposal.max_per_img, scale)
    train.rcnn.sampler.num = scaled_count(train.rcnn.sampler.num, scale)
    test.rpn.nms_pre = scaled_count(test.rpn.nms_pre, scale)
    test.rpn.max_per_img = scaled_count(test.rpn.max_per_img, scale)
    test.rcnn.max_per_img = scaled_count(test.rcnn.max_per_img, scale)
    test.rcnn.score_thr = 0.0
    cfg.optim_wrapper.optimizer.lr = LR
    return cfg


def without_norms(model):
    """``model`` (changed in place) with every BatchNorm-like layer replaced by
    ``nn.Identity`` and every CenConv / WSConv by an ``nn.Conv2d`` of the same
    geometry with a bias: the architecture ``mmnorm.fuse`` leaves."""
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, _BatchNorm):
                parent._modules[name] = nn.Identity()
            elif isinstance(child, (CenConv, WSConv)):
                parent._modules[name] = nn.Conv2d(
                    child.in_channels, child.out_channels, child.kernel_size, child.stride,
                    child.padding, child.dilation, child.groups, bias=True,
                    padding_mode=child.padding_mode)
    return model.eval()


def architecture(model):
    """Module classes by name, and parameter and buffer shapes by name."""
    modules = {name: type(m).__name__ for name, m in model.named_modules()}
    tensors = {name: tuple(t.shape) for name, t in
               list(model.named_parameters()) + list(model.named_buffers())}
    return modules, tensors


def architecture_differences(first, second, limit=5):
    """Up to ``limit`` entries of ``architecture`` that differ between the two models."""
    found = []
    for mine, theirs in zip(architecture(first), architecture(second)):
        for name in sorted(set(mine) | set(theirs)):
            if mine.get(name) != theirs.get(name):
                found.append(f'{name}: {mine.get(name)} / {theirs.get(name)}')
    return found[:limit]


def quiet_init(model):
    """``model.init_weights()`` without mmengine's per-parameter INFO log."""
    import logging

    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)


def build(method, scale):
    """(model, optim wrapper or None) for ``method``, deterministic (seed 0).
    The 'no norm' model gets the weights of the folded model, so that the two
    compute the same numbers and differ only in how they were made."""
    import mmdet.models  # noqa: F401  (registers MMDetection's modules)
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, DefaultScope
    cfg = model_config(method, scale)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
        quiet_init(model)
        if method.variant == 'fused':
            return fuse(model), None
        if method.variant == 'no norm':
            plain = without_norms(copy.deepcopy(model))
            plain.load_state_dict(fuse(model).state_dict())  # strict: same tensors
            return plain, None
        return model, build_optim_wrapper(model, cfg.optim_wrapper)


def make_batch(scale, seed=0):
    """Two deterministic BGR uint8 images with GT_PER_IMAGE boxes, labels and
    bitmap masks (filled rectangles) each, as a data loader gives them."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    h, w = image_size(scale)
    rng = np.random.default_rng(seed)
    inputs, samples = [], []
    for index in range(2):
        size = rng.uniform(0.15, 0.5, (GT_PER_IMAGE, 2)) * (w, h)
        corner = rng.uniform(0, 1, (GT_PER_IMAGE, 2)) * ((w, h) - size)
        boxes = np.concatenate([corner, corner + size], 1).round().astype(np.float32)
        masks = np.zeros((GT_PER_IMAGE, h, w), np.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.astype(int)):
            mask[y0:y1, x0:x1] = 1
        sample = DetDataSample(metainfo=dict(img_id=index, img_shape=(h, w), ori_shape=(h, w),
                                             scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(
            bboxes=torch.from_numpy(boxes),
            labels=torch.from_numpy(rng.integers(0, 80, GT_PER_IMAGE)),
            masks=BitmapMasks(masks, h, w))
        inputs.append(torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


# ------------------------------------------------------------- measuring
def train_iteration(model, optim_wrapper, batch):
    """One training iteration: (total, forward, backward, step) seconds and the loss."""
    torch.manual_seed(0)  # the same RoI sampling every iteration
    start = time.perf_counter()
    data = model.data_preprocessor(batch, True)
    loss, _ = model.parse_losses(model(**data, mode='loss'))
    forward = time.perf_counter()
    optim_wrapper.backward(loss)
    backward = time.perf_counter()
    optim_wrapper.step()
    optim_wrapper.zero_grad()
    end = time.perf_counter()
    return (end - start, forward - start, backward - forward, end - backward), loss.item()


def inference(model, batch):
    """One inference: (seconds,) and the number of detections in the batch."""
    start = time.perf_counter()
    with torch.no_grad():
        outputs = model.test_step(batch)
    return (time.perf_counter() - start,), sum(len(o.pred_instances) for o in outputs)


@dataclass
class Result:
    method: Method
    train: list = field(default_factory=list)  # medians: total, forward, backward, step
    train_spread: tuple = ()  # (min, max) of the total
    loss: float = math.nan  # of the last iteration
    infer: float = math.nan
    infer_spread: tuple = ()
    detections: int = 0  # in the batch, at the last inference
    memory: dict = field(default_factory=dict)  # 'train' / 'inference' -> KiB
    memory_error: str = ''
    error: str = ''


def timed_rounds(results, run, warmups, repeats, phase):
    """Alternate ``run(method key)`` over the results without an error (see
    ``median_times``); returns per result the list of timed samples. An
    exception becomes that result's error, and its later calls are skipped.
    Each call's time goes to stderr, labelled ``phase``."""
    live = [r for r in results if not r.error]
    samples = {r.method.key: [] for r in live}
    calls = Counter()

    def step(result):
        key = result.method.key
        calls[key] += 1
        if result.error:
            return (math.nan,)
        try:
            times = run(key)
        except Exception as exc:  # noqa: BLE001  (one failing method is a row, not the end)
            result.error = describe_error(exc)
            return (math.nan,)
        timed = calls[key] > warmups[key]
        if timed:
            samples[key].append(times)
        print(f'[{phase} {result.method.name}: {times[0]:.1f} s{"" if timed else ", warm-up"}]',
              file=sys.stderr, flush=True)
        return times

    median_times(live, step, [warmups[r.method.key] for r in live], repeats, 0.0)
    return samples


def measure_times(results, models, optimizers, batches, args):
    """Fill in the training and inference times of ``results`` (module docstring)."""
    trained = [r for r in results if r.method.trains and not r.error]
    losses = {}

    def train(key):
        times, losses[key] = train_iteration(models[key], optimizers[key], batches[key])
        return times

    for r in trained:
        models[r.method.key].train()
    warmups = {r.method.key: max(args.warmup, steps_to_fill(models[r.method.key]))
               for r in trained}
    samples = timed_rounds(trained, train, warmups, args.repeats, 'train')
    for r in trained:
        if not r.error:
            check_history_full(models[r.method.key])
            columns = list(zip(*samples[r.method.key]))
            r.train = [statistics.median(column) for column in columns]
            r.train_spread = (min(columns[0]), max(columns[0]))
            r.loss = losses[r.method.key]
    for model in models.values():
        model.eval()
    live = [r for r in results if not r.error]
    detections = {}

    def infer(key):
        times, detections[key] = inference(models[key], batches[key])
        return times

    samples = timed_rounds(live, infer, {r.method.key: args.warmup for r in live}, args.repeats,
                           'inference')
    for r in live:
        if not r.error:
            times = [sample[0] for sample in samples[r.method.key]]
            r.infer, r.infer_spread = statistics.median(times), (min(times), max(times))
            r.detections = detections[r.method.key]


def status_kib(key):
    """``key`` ('VmRSS', 'VmHWM') of /proc/self/status, in KiB."""
    with open('/proc/self/status') as f:
        return int(re.search(rf'^{key}:\s*(\d+) kB', f.read(), re.M).group(1))


def peak_above_current(run):
    """Peak RSS during ``run()`` minus the RSS before it, in KiB (Linux)."""
    before = status_kib('VmRSS')
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # reset the peak RSS (VmHWM) to the current RSS
    except OSError as exc:
        raise RuntimeError(
            f'memory measurement: cannot reset the peak RSS through /proc/self/clear_refs '
            f'({exc}); it needs Linux >= 4.0. Run with --skip-memory.') from exc
    run()
    return status_kib('VmHWM') - before


def measure_memory_here(method, args):
    """The subprocess side: memory of one training iteration and one inference
    of ``method`` (module docstring), printed as a JSON line after MEMORY_MARK."""
    model, optim_wrapper = build(method, args.scale)
    batch = make_batch(args.scale)
    memory = {}
    if method.trains:
        model.train()
        for _ in range(max(1, steps_to_fill(model))):
            train_iteration(model, optim_wrapper, batch)
        memory['train'] = peak_above_current(lambda: train_iteration(model, optim_wrapper, batch))
    model.eval()
    inference(model, batch)
    memory['inference'] = peak_above_current(lambda: inference(model, batch))
    print(MEMORY_MARK + json.dumps(memory), flush=True)
    return memory


def measure_memory(result, args):
    """Run ``--measure-memory-of`` for ``result``'s method in a fresh subprocess."""
    cmd = [sys.executable, str(TOOL), '--measure-memory-of', result.method.key,
           '--scale', str(args.scale), '--threads', str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD),
               OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MEMORY_MARK)]
    if proc.returncode != 0 or not lines:
        tail = proc.stdout.strip().splitlines()[-1:] or ['no output']
        result.memory_error = (f'subprocess exited {proc.returncode}: '
                               f'{tail[0]}').replace('|', '/')[:300]
        return
    result.memory = json.loads(lines[-1][len(MEMORY_MARK):])


# -------------------------------------------------------------- profiling
def module_ranges(model):
    """Forward hooks that wrap every module's forward in a profiler range named
    ``module|<component>|<class>`` (component: the first part of the module's
    name). Returns the hook handles."""
    from torch.autograd.profiler import record_function
    stack, handles = [], []
    for name, module in model.named_modules():
        label = f'module|{name.split(".")[0] or "model"}|{type(module).__name__}'

        def enter(mod, args, label=label):
            stack.append(record_function(label))
            stack[-1].__enter__()

        def leave(mod, args, output):
            stack.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def attribute(events):
    """Self CPU seconds of ``events`` (a torch.profiler event list) by
    (component, module class, pass): pass 'forward' or 'backward'; optimizer
    calls are ('optimizer', 'SGD step + zero_grad', 'step'); ops outside every
    module ('other', 'outside modules', pass)."""
    def owner(event):
        """(root event, innermost module range) of ``event``."""
        module, root = None, event
        while True:
            if module is None and root.name.startswith('module|'):
                module = root.name
            if root.cpu_parent is None:
                return root, module
            root = root.cpu_parent

    by_sequence, totals = {}, Counter()
    resolved = [(event, *owner(event)) for event in events]
    for event, root, module in resolved:
        if module and event.sequence_nr >= 0 and not root.name.startswith('autograd::'):
            by_sequence.setdefault(event.sequence_nr, module)
    for event, root, module in resolved:
        if root.name.startswith('Optimizer.'):
            key = ('optimizer', 'SGD step + zero_grad', 'step')
        elif root.name.startswith('autograd::'):
            label = by_sequence.get(root.sequence_nr)
            key = (*(label.split('|')[1:] if label else ('other', 'outside modules')), 'backward')
        elif module:
            key = (*module.split('|')[1:], 'forward')
        else:
            key = ('other', 'outside modules', 'forward')
        totals[key] += event.self_cpu_time_total / 1e6
    return totals


def profile_training(model, optim_wrapper, batch):
    from torch.profiler import ProfilerActivity, profile
    handles = module_ranges(model)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_iteration(model, optim_wrapper, batch)
    finally:
        for handle in handles:
            handle.remove()
    return attribute(prof.events())


def profile_tables(profiles):
    """Markdown tables of ``profiles`` (method name -> ``attribute`` result),
    by component and by module class (forward and backward)."""
    names = list(profiles)
    lines = []
    for title, group in (('component', lambda key: (key[0], key[2])),
                         ('module class', lambda key: (key[1], key[2]))):
        sums = {name: Counter() for name in names}
        for name, totals in profiles.items():
            for key, seconds in totals.items():
                sums[name][group(key)] += seconds
        keys = sorted(set().union(*sums.values()), key=lambda k: -max(s[k] for s in sums.values()))
        shown = [k for k in keys if max(s[k] for s in sums.values()) >= 0.01 * max(
            sum(s.values()) for s in sums.values())]
        lines += ['', f'By {title} (ms of self CPU time; rows under 1% of the total left out):',
                  '']
        lines += markdown_table([title, 'pass'] + names,
                                [list(key) + [fmt_ms(sums[n][key]) for n in names]
                                 for key in shown]).splitlines()
        lines.append('| total | | ' + ' | '.join(fmt_ms(sum(sums[n].values())) for n in names)
                     + ' |')
        if {'MABN', 'FrozenBN'} <= set(names):
            change = sums['MABN'].copy()
            change.subtract(sums['FrozenBN'])
            top = ', '.join(f'{" ".join(filter(None, key))} {seconds * 1e3:+.0f} ms'
                            for key, seconds in change.most_common(4))
            lines += ['', f'Largest increases MABN - FrozenBN: {top}.']
    return lines


# ------------------------------------------------------------------ report
def ratio(value, base):
    return value / base if base and not math.isnan(base) else math.nan


def fmt_ratio(value):
    return '-' if math.isnan(value) else f'{value:.2f}x'


def fmt_mib(kib):
    return f'{kib / 1024:.1f}' if kib is not None else '-'


def train_ratio(results, key, base_key):
    """Training time of method ``key`` / that of ``base_key`` (nan if either is missing)."""
    by_key = {r.method.key: r for r in results}
    mine, base = by_key.get(key), by_key.get(base_key)
    if not (mine and base and mine.train and base.train):
        return math.nan
    return ratio(mine.train[0], base.train[0])


def mabn_verdict(results):
    """(ratio, 'met' / 'MISSED' / 'not measured') for the aim AIM."""
    value = train_ratio(results, AIM[0], BASELINE)
    return value, ('not measured' if math.isnan(value)
                   else 'met' if value <= AIM[1] else 'MISSED')


def fold_verdict(results):
    """(fused / no-norm inference ratio, verdict)."""
    by_key = {r.method.key: r for r in results}
    fused, plain = by_key.get('mabn-fused'), by_key.get('no-norm')
    if not (fused and plain) or math.isnan(fused.infer) or math.isnan(plain.infer):
        return math.nan, 'not measured'
    value = ratio(fused.infer, plain.infer)
    return value, ('equal' if abs(value - 1) <= EQUAL_TOLERANCE
                   else 'different') + f' (tolerance {EQUAL_TOLERANCE:.0%})'


def table(results, skip_memory):
    base = next(r for r in results if r.method.key == BASELINE)
    header = ['method', 'config', 'train ms (min-max)', 'train x',
              'forward / backward / step ms', 'inference ms (min-max)', 'inference x',
              'detections', 'last loss', 'train peak MB', 'train memory x', 'inference peak MB',
              'inference memory x']
    rows = []
    for r in results:
        cells = [r.method.name, r.method.describe()]
        if r.error:
            rows.append(cells + [f'not measured: {r.error}'] + [''] * (len(header) - 3))
            continue
        if r.train:
            cells += [f'{fmt_ms(r.train[0])} ({fmt_ms(r.train_spread[0])}-'
                      f'{fmt_ms(r.train_spread[1])})',
                      fmt_ratio(ratio(r.train[0], base.train[0] if base.train else math.nan)),
                      ' / '.join(fmt_ms(t) for t in r.train[1:])]
        else:
            cells += ['-', '-', '-']
        cells += [f'{fmt_ms(r.infer)} ({fmt_ms(r.infer_spread[0])}-{fmt_ms(r.infer_spread[1])})',
                  fmt_ratio(ratio(r.infer, base.infer)), str(r.detections),
                  f'{r.loss:.3f}' if r.train else '-']
        if skip_memory:
            cells += ['not measured (--skip-memory)'] + [''] * 3
        elif r.memory_error:
            cells += [f'not measured: {r.memory_error}'] + [''] * 3
        else:
            for phase in ('train', 'inference'):
                kib = r.memory.get(phase)
                cells += [fmt_mib(kib), fmt_ratio(ratio(kib, base.memory.get(phase))
                                                  if kib else math.nan)]
        rows.append(cells)
    return markdown_table(header, rows).splitlines()


def aims_table(results):
    """The aims table's lines: the MABN aim, issue 7's fold and, as context,
    MABN / BN."""
    aim_value, aim_status = mabn_verdict(results)
    fold_value, fold_status = fold_verdict(results)
    rows = [[f'whole-model training iteration with MABN within {AIM[1]}x of frozen BN',
             fmt_ratio(aim_value), aim_status],
            ['issue 7: inference of the folded MABN model equals the same architecture with '
             'no norm layers', fmt_ratio(fold_value), fold_status],
            ['(context, no aim) MABN / BN training iteration: the same architecture, recipe '
             'and initialisation with BN', fmt_ratio(train_ratio(results, 'mabn', 'bn')), '-']]
    return markdown_table(['aim', 'measured', 'verdict'], rows).splitlines()


def report(results, args, argv, loads, fold_check, profiles):
    """The markdown of the run: its settings, the table, the aims and the profiles."""
    import mmcv
    import mmdet
    h, w = image_size(args.scale)
    command = ' '.join(['python tools/benchmark_models.py'] + list(argv))
    lines = [
        '# Model benchmark: Mask R-CNN R-50-FPN per method, training iteration and inference',
        '',
        f'Command: `{command}`  ',
        f'torch {torch.__version__}, mmdet {mmdet.__version__}, mmcv {mmcv.__version__}, CPU, '
        f'{torch.get_num_threads()} thread(s). Load average (1, 5, 15 min) on {os.cpu_count()} '
        f'CPUs: {loads[0]} at the start, {loads[1]} at the end; other processes on the same '
        'cores make the times noisy.',
        '',
        f'Inputs: the same 2 synthetic images of {h}x{w} (scale {args.scale} of {IMAGE[0]}x'
        f'{IMAGE[1]}) per iteration, {GT_PER_IMAGE} ground-truth boxes, labels and bitmap '
        f'masks each; RoIs: {scaled_count(512, args.scale)} sampled per image in training, '
        f'{scaled_count(1000, args.scale)} proposals and {scaled_count(100, args.scale)} '
        'detections per image at inference (score threshold 0, so the mask head always '
        'runs on the full quota; the detections column counts them, over both images, at '
        'the last inference). No pretrained weights (backbone.init_cfg=None). "no norm" is the '
        'MABN model with every norm replaced by nn.Identity and every CenConv by a new '
        'nn.Conv2d with a bias, loaded with the folded model\'s weights.',
        '',
        f'Train: data preprocessor + loss + backward + SGD step (each config\'s optimizer, lr '
        f'{LR:g}), in train mode (frozen stages and norm_eval as the config says). Inference: '
        'test_step (preprocessor + predict with rescaled boxes and pasted masks) in eval mode '
        f'under no_grad. Each time is the median of {args.repeats} alternated rounds (methods '
        f'take turns, the order reversed every round) after {args.warmup} warm-up iterations '
        'per model; CBN\'s burn-in is set to 0 and it warms up for burn-in + buffer_num '
        'iterations, so every timed CBN step uses a full, compensated history (checked); MABN '
        'keeps its window warm-up (its first 16 and up to 100 steps use the batch '
        'statistics; the cost per step is the same). Ratios are to FrozenBN.',
        '',
        'Memory: per method in a fresh process (`--measure-memory-of METHOD`): after the '
        'model is built and has run one training iteration (CBN: buffer_num = 3, to fill its '
        'history), '
        'the peak resident set size during one training '
        'iteration minus the resident set size just before it (Linux: VmHWM, reset to VmRSS '
        'through /proc/self/clear_refs just before, minus that VmRSS; getrusage\'s '
        'ru_maxrss is the same number until a thread exits, and then keeps an older peak); '
        'then the same for one inference after one warm-up inference. glibc\'s '
        f'MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} in that process gives every allocation of '
        f'{MMAP_THRESHOLD // 1024} KiB or more its own mapping, returned to the system on '
        'free, so the resident set follows the live tensors. So it is the transient memory '
        'of the iteration (activations, the gradients, temporaries), not the model\'s '
        'weights, '
        'optimizer state or persistent buffers, which are resident before.',
        '',
    ]
    lines += table(results, args.skip_memory)
    lines += ['', '## Aims', '']
    lines += aims_table(results)
    if fold_check is not None:
        lines += ['', 'The folded model and the no-norm model have the same modules and the '
                  'same parameter and buffer shapes: '
                  + ('yes.' if not fold_check else 'NO: ' + '; '.join(fold_check))]
    if profiles:
        lines += ['', '## Where the training time goes', '',
                  'One training iteration per method under torch.profiler (after the timed '
                  'rounds); the profiler\'s own overhead inflates the many small ops. Each op\'s '
                  'self time counts for the innermost module whose forward (called as a module) '
                  'ran it; a backward op for the module whose forward created it. "model / '
                  'MaskRCNN" is MMDetection code the detector runs through methods rather than '
                  'module calls (anchors, proposals and NMS, target assignment and sampling, '
                  'mask targets, the losses\' glue) and the residual additions belong to '
                  '"Bottleneck"; "other / outside modules" is loss parsing and autograd '
                  'bookkeeping (gradient accumulation).']
        lines += profile_tables(profiles)
    return '\n'.join(lines) + '\n'


RATIO_COLUMNS = {'train': 'train x', 'inference': 'inference x',
                 'train memory': 'train memory x', 'inference memory': 'inference memory x'}


def ratios_from_results(results):
    """Method name -> {key of RATIO_COLUMNS: ratio to FrozenBN (nan: not measured)},
    for the methods measured."""
    base = next(r for r in results if r.method.key == BASELINE)

    def train_time(r):
        return r.train[0] if r.train else math.nan

    return {r.method.name: {
        'train': ratio(train_time(r), train_time(base)),
        'inference': ratio(r.infer, base.infer),
        'train memory': ratio(r.memory.get('train', math.nan), base.memory.get('train')),
        'inference memory': ratio(r.memory.get('inference', math.nan),
                                  base.memory.get('inference'))}
        for r in results if not r.error}


def ratios_from_markdown(markdown):
    """The same, read back from the table of ``report``'s markdown."""
    table = next((t for t in markdown_tables(markdown) if t and 'method' in t[0]), None)
    if table is None:
        raise ValueError('--plot-from: no table with a "method" column in the markdown')
    return {row['method']: {key: float(row[column].rstrip('x'))
                            if re.fullmatch(r'[\d.]+x', row[column]) else math.nan
                            for key, column in RATIO_COLUMNS.items()}
            for row in table if not row['train ms (min-max)'].startswith('not measured')}


def plot(ratios, path):
    """Bars of the time ratios (and memory ratios, when measured) per method,
    training and inference side by side; ``ratios`` as ``ratios_from_results``."""
    from matplotlib.figure import Figure
    names = list(ratios)
    panels = [('time / FrozenBN', '')]
    if any(not math.isnan(r['train memory']) for r in ratios.values()):
        panels.append(('peak memory / FrozenBN', ' memory'))
    fig = Figure(figsize=(max(7.0, 1.3 * len(names)), 3.6 * len(panels)), layout='constrained')
    x = np.arange(len(names))
    for axis, (label, suffix) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        for i, (phase, series) in enumerate((('training iteration', 'train'),
                                             ('inference', 'inference'))):
            axis.bar(x + (i - 0.5) * 0.4, [ratios[n][series + suffix] for n in names], 0.4,
                     label=phase)
        axis.axhline(1.0, color='black', linewidth=0.8)
        if not suffix:
            axis.axhline(AIM[1], color='red', linestyle='--', linewidth=1,
                         label=f'aim: MABN training <= {AIM[1]}x')
        axis.set_xticks(x, names)
        axis.set_ylabel(label)
        axis.legend(fontsize='small', loc='upper left', bbox_to_anchor=(1.0, 1.0))
    fig.suptitle('Mask R-CNN R-50-FPN, 2 images, CPU: ratios to frozen BN')
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------- run
def build_all(results, scale):
    """(models, optim wrappers, batches), each a dict by method key, for the
    methods of ``results``; a method that cannot be built gets the error in
    its result, the baseline must build."""
    models, optimizers, batches = {}, {}, {}
    for r in results:
        try:
            models[r.method.key], optimizers[r.method.key] = build(r.method, scale)
            batches[r.method.key] = make_batch(scale)
        except Exception as exc:  # noqa: BLE001  (one failing method is a row, not the end)
            r.error = describe_error(exc)
    baseline = next(r for r in results if r.method.key == BASELINE)
    if baseline.error:
        raise RuntimeError(f'the baseline FrozenBN could not be built: {baseline.error}')
    return models, optimizers, batches


def profile_all(results, models, optimizers, batches):
    """Method name -> ``profile_training`` of each PROFILED method measured."""
    profiles = {}
    for r in results:
        if r.method.key in PROFILED and not r.error:
            model = models[r.method.key].train()
            profiles[r.method.name] = profile_training(model, optimizers[r.method.key],
                                                       batches[r.method.key])
    return profiles


def run(args, argv):
    """Run the benchmark as tools/benchmark_models.py's options ``args``
    (parsed from ``argv``; ``args.methods`` are Methods) ask; print the
    markdown and return it (None with --plot-from, the memory dict with
    --measure-memory-of)."""
    if args.plot_from:
        redraw(args.plot_from, ratios_from_markdown, plot)
        return None
    torch.set_num_threads(args.threads)
    if args.measure_memory_of:
        return measure_memory_here(next(m for m in METHODS if m.key == args.measure_memory_of),
                                   args)
    start_load = load_average()
    results = [Result(method) for method in args.methods]
    models, optimizers, batches = build_all(results, args.scale)
    fold_check = None
    if 'mabn-fused' in models and 'no-norm' in models:
        fold_check = architecture_differences(models['mabn-fused'], models['no-norm'])
    print(f'[built {len(models)} models; timing]', file=sys.stderr, flush=True)
    measure_times(results, models, optimizers, batches, args)
    profiles = {}
    if args.profile or mabn_verdict(results)[1] == 'MISSED':
        profiles = profile_all(results, models, optimizers, batches)
    del models, optimizers
    if not args.skip_memory:
        for r in results:
            if not r.error:
                print(f'[memory of {r.method.name}]', file=sys.stderr, flush=True)
                measure_memory(r, args)
    markdown = report(results, args, argv, (start_load, load_average()), fold_check, profiles)
    print(markdown)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown)
        plot(ratios_from_results(results), out.with_suffix('.png'))
    return markdown
