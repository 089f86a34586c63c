"""Speed and memory of whole Mask R-CNN R-50-FPN models, one per method
(METHODS), in one run: what tools/benchmark_models.py measures and writes.
docs/benchmarks.md says how each column is measured: training iterations and
inferences alternated between the models, memory in a fresh process per
method (``--measure-memory-of``), and with ``--profile`` where a training
iteration spends its time.
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
from . import common
from .common import fmt_ms, fmt_ratio, ratio, scaled_count

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / 'tools' / 'benchmark_models.py'  # its --measure-memory-of runs the subprocess
IMAGE = (512, 832)  # (H, W) at --scale 1, multiples of 32 (the configs' pad size divisor)
LR = 0.02 * 0.001
GT_PER_IMAGE = 3
MMAP_THRESHOLD = 128 * 1024
PROFILED = ('frozenbn', 'bn', 'mabn')
MEMORY_MARK = 'MEMORY_KIB '
#: (method, the method it is divided by, phase): the ratios between methods the report gives
PAIRS = (('mabn-fused', 'no-norm', 'inference'), ('mabn', 'bn', 'train'))


# ---------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    key: str  # the --methods name
    name: str
    config: str
    trains: bool = True
    variant: str = ''  # 'fused' or 'no norm': derived from the config's model

    def describe(self):
        """Returns the config and the change made to its model, as the table shows them."""
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
    """Returns (H, W) of the benchmark's images at ``scale``."""
    return common.padded_size(IMAGE, scale)


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
    """Returns ``method``'s config with the benchmark's changes (module
    docstring; RoI counts times ``scale``^2)."""
    from mmengine.config import Config

    from ..engine.runtime import require_pkg_resources
    require_pkg_resources()
    cfg = Config.fromfile(REPO / 'configs' / method.config)
    model = cfg.model
    model.backbone.init_cfg = None
    without_cbn_burnin(model)
    train, test = model.train_cfg, model.test_cfg
    for part, key in ((train.rpn_proposal, 'nms_pre'), (train.rpn_proposal, 'max_per_img'),
                      (train.rcnn.sampler, 'num'), (test.rpn, 'nms_pre'),
                      (test.rpn, 'max_per_img'), (test.rcnn, 'max_per_img')):
        part[key] = scaled_count(part[key], scale)
    test.rcnn.score_thr = 0.0
    cfg.optim_wrapper.optimizer.lr = LR
    return cfg


def without_norms(model):
    """Returns ``model`` (changed in place, in eval mode) with every
    BatchNorm-like layer replaced by ``nn.Identity`` and every CenConv / WSConv
    by an ``nn.Conv2d`` of the same geometry with a bias: the architecture
    ``mmnorm.fuse`` leaves."""
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


def architecture_differences(first, second, limit=5):
    """Returns up to ``limit`` differences ('name: first / second') between the
    two models' module classes and parameter and buffer shapes, by name."""
    def architecture(model):
        return ({name: type(m).__name__ for name, m in model.named_modules()},
                {name: tuple(t.shape) for name, t in
                 list(model.named_parameters()) + list(model.named_buffers())})

    found = []
    for mine, theirs in zip(architecture(first), architecture(second)):
        found += [f'{name}: {mine.get(name)} / {theirs.get(name)}'
                  for name in sorted(set(mine) | set(theirs)) if mine.get(name) != theirs.get(name)]
    return found[:limit]


def build(method, scale):
    """Returns (model, optim wrapper or None) for ``method``, deterministic
    (seed 0). The 'no norm' model gets the weights of the folded model, so that
    the two compute the same numbers and differ only in how they were made."""
    import logging

    import mmdet.models  # noqa: F401  (registers MMDetection's modules)
    from mmengine.logging import MMLogger
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, DefaultScope
    cfg = model_config(method, scale)
    torch.manual_seed(0)
    logger = MMLogger.get_current_instance()
    level = logger.level
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
        logger.setLevel(logging.WARNING)  # no INFO line per initialised parameter
        try:
            model.init_weights()
        finally:
            logger.setLevel(level)
        if method.variant == 'fused':
            return fuse(model), None
        if method.variant == 'no norm':
            plain = without_norms(copy.deepcopy(model))
            plain.load_state_dict(fuse(model).state_dict())  # strict: same tensors
            return plain, None
        return model, build_optim_wrapper(model, cfg.optim_wrapper)


def make_batch(scale, seed=0):
    """Returns two deterministic BGR uint8 images with GT_PER_IMAGE boxes,
    labels and bitmap masks (filled rectangles) each, as a data loader gives them."""
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
    """Run one training iteration. Returns ((total, forward, backward, step)
    seconds, the loss)."""
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
    """Run one inference. Returns ((seconds,), the number of detections in the batch)."""
    start = time.perf_counter()
    with torch.no_grad():
        outputs = model.test_step(batch)
    return (time.perf_counter() - start,), sum(len(o.pred_instances) for o in outputs)


@dataclass
class Result:
    """The measurements of one method."""
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

    def time(self, phase):
        """Returns the median seconds in ``phase`` ('train' or 'inference'), nan if not measured."""
        return self.infer if phase == 'inference' else self.train[0] if self.train else math.nan


def timed_rounds(results, run, warmups, repeats, phase):
    """Alternate ``run(method key)``, which returns (seconds, ...) and a value
    to keep, over ``results`` (``common.median_times``), each call's time to
    stderr labelled ``phase``. An exception becomes that result's error, and
    its later calls are skipped. Returns, per result key still without an
    error, (the medians of the numbers, (min, max) of the first, the value
    kept at the last call)."""
    samples, kept, calls = {r.method.key: [] for r in results}, {}, Counter()

    def step(result):
        key = result.method.key
        calls[key] += 1
        if result.error:
            return (math.nan,)
        try:
            times, kept[key] = run(key)
        except Exception as exc:  # noqa: BLE001  (one failing method is a row, not the end)
            result.error = common.describe_error(exc, 300)
            return (math.nan,)
        timed = calls[key] > warmups[key]
        if timed:
            samples[key].append(times)
        print(f'[{phase} {result.method.name}: {times[0]:.1f} s{"" if timed else ", warm-up"}]',
              file=sys.stderr, flush=True)
        return times

    common.median_times(results, step, [warmups[r.method.key] for r in results], repeats)
    summary = {}
    for r in results:
        if not r.error:
            rows = samples[r.method.key]
            totals = [times[0] for times in rows]
            summary[r.method.key] = ([statistics.median(c) for c in zip(*rows)],
                                     (min(totals), max(totals)), kept[r.method.key])
    return summary


def measure_times(results, models, optimizers, batches, args):
    """Fill in the training and inference times of ``results`` (docs/benchmarks.md)."""
    trained = [r for r in results if r.method.trains and not r.error]
    for r in trained:
        models[r.method.key].train()
    warmups = {r.method.key: max(args.warmup, common.steps_to_fill(models[r.method.key]))
               for r in trained}
    timed = timed_rounds(trained, lambda key: train_iteration(models[key], optimizers[key],
                                                              batches[key]),
                         warmups, args.repeats, 'train')
    for r in trained:
        if r.method.key in timed:
            common.check_history_full(models[r.method.key])
            r.train, r.train_spread, r.loss = timed[r.method.key]
    for model in models.values():
        model.eval()
    live = [r for r in results if not r.error]
    timed = timed_rounds(live, lambda key: inference(models[key], batches[key]),
                         {r.method.key: args.warmup for r in live}, args.repeats, 'inference')
    for r in live:
        if r.method.key in timed:
            (r.infer,), r.infer_spread, r.detections = timed[r.method.key]


def peak_above_current(run):
    """Run ``run()``. Returns the peak RSS during it minus the RSS before it, in KiB (Linux)."""
    def status_kib(key):
        with open('/proc/self/status') as f:
            return int(re.search(rf'^{key}:\s*(\d+) kB', f.read(), re.M).group(1))

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
    """The subprocess side: the memory of one training iteration and one
    inference of ``method`` (docs/benchmarks.md), printed as a JSON line after
    MEMORY_MARK. Returns it: {'train' / 'inference': KiB}."""
    model, optim_wrapper = build(method, args.scale)
    batch = make_batch(args.scale)
    memory = {}
    if method.trains:
        model.train()
        for _ in range(max(1, common.steps_to_fill(model))):
            train_iteration(model, optim_wrapper, batch)
        memory['train'] = peak_above_current(lambda: train_iteration(model, optim_wrapper, batch))
    model.eval()
    inference(model, batch)
    memory['inference'] = peak_above_current(lambda: inference(model, batch))
    print(MEMORY_MARK + json.dumps(memory), flush=True)
    return memory


def measure_memory(result, args):
    """Run ``--measure-memory-of`` for ``result``'s method in a fresh
    subprocess; fill in ``result.memory`` or ``result.memory_error``."""
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
def profile_training(model, optim_wrapper, batch):
    """Profile one training iteration. Returns its self CPU seconds by
    (component, module class, pass): component is the first part of the
    module's name, pass 'forward' or 'backward'; optimizer calls are
    ('optimizer', 'SGD step + zero_grad', 'step'), ops outside every module
    ('other', 'outside modules', pass)."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile
    stack, handles = [], []
    for name, module in model.named_modules():  # a profiler range per module call
        label = f'module|{name.split(".")[0] or "model"}|{type(module).__name__}'

        def enter(mod, args, label=label):
            stack.append(record_function(label))
            stack[-1].__enter__()

        def leave(mod, args, output):
            stack.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_iteration(model, optim_wrapper, batch)
    finally:
        for handle in handles:
            handle.remove()

    def owner(event):
        """Returns (root event, innermost module range) of ``event``."""
        module, root = None, event
        while True:
            if module is None and root.name.startswith('module|'):
                module = root.name
            if root.cpu_parent is None:
                return root, module
            root = root.cpu_parent

    by_sequence, totals = {}, Counter()
    resolved = [(event, *owner(event)) for event in prof.events()]
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


def profile_tables(profiles):
    """Returns the lines of the tables of ``profiles`` (method name ->
    ``profile_training``), by component and by module class (and pass)."""
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
def table(results, skip_memory):
    """Returns the main table's lines: one row per method, ratios to FrozenBN."""
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
            low, high = r.train_spread
            cells += [f'{fmt_ms(r.train[0])} ({fmt_ms(low)}-{fmt_ms(high)})',
                      fmt_ratio(ratio(r.time('train'), base.time('train'))),
                      ' / '.join(fmt_ms(t) for t in r.train[1:])]
        else:
            cells += ['-', '-', '-']
        low, high = r.infer_spread
        cells += [f'{fmt_ms(r.infer)} ({fmt_ms(low)}-{fmt_ms(high)})',
                  fmt_ratio(ratio(r.infer, base.infer)), str(r.detections),
                  f'{r.loss:.3f}' if r.train else '-']
        if skip_memory or r.memory_error:
            reason = ' (--skip-memory)' if skip_memory else f': {r.memory_error}'
            cells += [f'not measured{reason}', '', '', '']
        else:
            for phase in ('train', 'inference'):
                kib = r.memory.get(phase)
                cells += [common.fmt_mb(kib * 1024) if kib else '-',
                          fmt_ratio(ratio(kib, base.memory.get(phase)))]
        rows.append(cells)
    return markdown_table(header, rows).splitlines()


def pairs_table(results):
    """Returns the lines of the table of PAIRS: each ratio between two methods
    ('-' where either was not measured)."""
    by_key = {r.method.key: r for r in results if not r.error}
    names = {m.key: m.name for m in METHODS}
    rows = [[f'{names[key]} / {names[base]}', phase,
             fmt_ratio(ratio(by_key[key].time(phase), by_key[base].time(phase))
                       if key in by_key and base in by_key else math.nan)]
            for key, base, phase in PAIRS]
    return markdown_table(['methods', 'phase', 'measured'], rows).splitlines()


def report(results, args, argv, loads, fold_check, profiles):
    """Returns the markdown of the run: its settings, the tables and the profiles."""
    import mmcv
    import mmdet
    h, w = image_size(args.scale)
    lines = [
        '# Model benchmark: Mask R-CNN R-50-FPN per method, training iteration and inference',
        '',
        f'Command: `{" ".join(["python tools/benchmark_models.py", *argv])}`  ',
        f'torch {torch.__version__}, mmdet {mmdet.__version__}, mmcv {mmcv.__version__}, CPU, '
        f'{torch.get_num_threads()} thread(s). Load average (1, 5, 15 min) on {os.cpu_count()} '
        f'CPUs: {loads[0]} at the start, {loads[1]} at the end; other processes on the same '
        'cores make the times noisy.',
        '',
        f'Inputs: the same 2 synthetic images of {h}x{w} (scale {args.scale} of {IMAGE[0]}x'
        f'{IMAGE[1]}) per iteration, {GT_PER_IMAGE} ground-truth boxes, labels and bitmap '
        f'masks each; RoIs: {scaled_count(512, args.scale)} sampled per image in training, '
        f'{scaled_count(1000, args.scale)} proposals and {scaled_count(100, args.scale)} '
        'detections per image at inference (score threshold 0; the detections column counts '
        'them over both images). No pretrained weights; SGD at lr '
        f'{LR:g}. Each time is the median of {args.repeats} alternated rounds after '
        f'{args.warmup} warm-up iterations per model (CBN: burn-in 0, then buffer_num '
        'iterations). Ratios are to FrozenBN. Memory: the peak resident set size of one '
        'iteration minus the resident set size before it, per method in a fresh process '
        f'with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}. How each column is measured: '
        'docs/benchmarks.md.',
        '',
    ]
    lines += table(results, args.skip_memory)
    lines += ['', '## Ratios between methods', '']
    lines += pairs_table(results)
    if fold_check is not None:
        lines += ['', 'The folded model and the no-norm model have the same modules and the '
                  'same parameter and buffer shapes: '
                  + ('yes.' if not fold_check else 'NO: ' + '; '.join(fold_check))]
    if profiles:
        lines += ['', '## Where the training time goes', '',
                  'One training iteration per method under torch.profiler, after the timed '
                  'rounds (the profiler\'s overhead inflates the many small ops); each op\'s '
                  'self time counts for the innermost module whose forward ran it or created '
                  'its autograd node. "model / MaskRCNN" is MMDetection code run through '
                  'methods rather than module calls (anchors, proposals, sampling, the losses); '
                  '"other / outside modules" is loss parsing and autograd bookkeeping.']
        lines += profile_tables(profiles)
    return '\n'.join(lines) + '\n'


# -------------------------------------------------------------------- plot
RATIO_COLUMNS = {'train': 'train x', 'inference': 'inference x',
                 'train memory': 'train memory x', 'inference memory': 'inference memory x'}


def ratios_from_markdown(markdown):
    """Returns, per method measured in the main table (the one with a 'method'
    column) of ``report``'s markdown, {key of RATIO_COLUMNS: ratio to
    FrozenBN (nan: not measured)}."""
    table = next((t for t in common.markdown_tables(markdown) if t and 'method' in t[0]), None)
    if table is None:
        raise ValueError('no table with a "method" column in the markdown')
    return {row['method']: {key: common.read_ratio(row[column])
                            for key, column in RATIO_COLUMNS.items()}
            for row in table if not row['train ms (min-max)'].startswith('not measured')}


def plot(markdown, path):
    """Write to ``path`` the bars of the time ratios (and memory ratios, when
    measured) per method in the table of ``markdown``, training and inference
    side by side."""
    ratios = ratios_from_markdown(markdown)
    names = list(ratios)
    panels = []
    for label, suffix in (('time / FrozenBN', ''), ('peak memory / FrozenBN', ' memory')):
        bars = {phase: [ratios[n][key + suffix] for n in names]
                for phase, key in (('training iteration', 'train'), ('inference', 'inference'))}
        if not suffix or not all(math.isnan(v) for v in bars['training iteration']):
            panels.append((label, bars))
    common.plot_bars(path, 'Mask R-CNN R-50-FPN, 2 images, CPU: ratios to frozen BN', names,
                     panels)


# --------------------------------------------------------------------- run
def run(args, argv):
    """Run the benchmark as tools/benchmark_models.py's options ``args``
    (parsed from ``argv``; ``args.methods`` are Methods) ask. Returns the
    markdown, printed (None with --plot-from, the memory dict with
    --measure-memory-of)."""
    if args.plot_from:
        return common.redraw(args.plot_from, plot)
    torch.set_num_threads(args.threads)
    if args.measure_memory_of:
        return measure_memory_here(next(m for m in METHODS if m.key == args.measure_memory_of),
                                   args)
    start_load = common.load_average()
    results = [Result(method) for method in args.methods]
    models, optimizers, batches = {}, {}, {}
    for r in results:
        try:
            models[r.method.key], optimizers[r.method.key] = build(r.method, args.scale)
            batches[r.method.key] = make_batch(args.scale)
        except Exception as exc:  # noqa: BLE001  (one failing method is a row, not the end)
            r.error = common.describe_error(exc, 300)
    if results[0].error:  # the baseline, FrozenBN, must build
        raise RuntimeError(f'the baseline FrozenBN could not be built: {results[0].error}')
    fold_check = None
    if 'mabn-fused' in models and 'no-norm' in models:
        fold_check = architecture_differences(models['mabn-fused'], models['no-norm'])
    print(f'[built {len(models)} models; timing]', file=sys.stderr, flush=True)
    measure_times(results, models, optimizers, batches, args)
    profiled = [r for r in results if args.profile and r.method.key in PROFILED and not r.error]
    profiles = {r.method.name: profile_training(models[r.method.key].train(),
                                                optimizers[r.method.key], batches[r.method.key])
                for r in profiled}
    del models, optimizers
    for r in results:
        if not (args.skip_memory or r.error):
            print(f'[memory of {r.method.name}]', file=sys.stderr, flush=True)
            measure_memory(r, args)
    markdown = report(results, args, argv, (start_load, common.load_average()), fold_check,
                      profiles)
    return common.publish(markdown, args.out, plot)
