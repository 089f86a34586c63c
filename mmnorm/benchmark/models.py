"""Speed and memory of whole Mask R-CNN R-50-FPN models, one per method
(METHODS), in one run, and with ``--profile`` where a training iteration
spends its time: what tools/benchmark_models.py measures and writes (how:
docs/benchmarks.md)."""
import copy
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter, namedtuple
from dataclasses import dataclass, field
from pathlib import Path

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
#: what a variant changes in its config's model, as the table's config column says it
VARIANTS = {'': '', 'fused': ', mmnorm.fuse', 'no norm': ', norms -> Identity, CenConv -> Conv2d'}


#: A method: its --methods name, its name in the tables, its config in configs/, whether it
#: trains, and a key of VARIANTS (the model made from the config's)
Method = namedtuple('Method', 'key name config trains variant', defaults=(True, ''))
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
    """Returns ``method``'s config with the benchmark's changes
    (docs/benchmarks.md; RoI counts times ``scale``^2)."""
    from mmengine.config import Config

    from ..engine.config import require_pkg_resources
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


def make_batch(scale):
    """Returns two deterministic BGR uint8 images with GT_PER_IMAGE boxes,
    labels and bitmap masks (filled rectangles) each, as a data loader gives them."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    h, w = image_size(scale)
    generator = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for index in range(2):
        boxes, masks = common.boxes_and_masks(GT_PER_IMAGE, (h, w), generator)
        samples.append(DetDataSample(metainfo=dict(img_id=index, img_shape=(h, w),
                                                   ori_shape=(h, w), scale_factor=(1.0, 1.0))))
        samples[-1].gt_instances = InstanceData(
            bboxes=boxes, labels=torch.randint(0, 80, (GT_PER_IMAGE,), generator=generator),
            masks=BitmapMasks(masks.numpy(), h, w))
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator))
    return dict(inputs=inputs, data_samples=samples)


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
    """One method: its model, optim wrapper (None: inference only) and batch
    while it is measured, then its measurements."""
    method: Method
    model: nn.Module = None
    optim_wrapper: object = None
    batch: dict = None
    medians: dict = field(default_factory=dict)  # 'train' / 'inference' -> seconds per part
    spreads: dict = field(default_factory=dict)  # 'train' / 'inference' -> (min, max) total
    last: dict = field(default_factory=dict)  # 'train': the loss, 'inference': detections
    memory: dict = field(default_factory=dict)  # 'train' / 'inference' -> KiB
    memory_error: str = ''
    error: str = ''

    def time(self, phase):
        """Returns the median seconds in ``phase`` ('train' or 'inference'), nan if not measured."""
        return self.medians[phase][0] if phase in self.medians else math.nan


def measure_times(results, args):
    """Fill in the training times of ``results``, then the inference times:
    the models take turns (``common.median_times``), each call's time to
    stderr. An exception becomes that method's error and skips its later calls."""
    for phase in ('train', 'inference'):
        live = [r for r in results if not r.error and (r.method.trains or phase == 'inference')]
        for r in live:
            r.model.train(phase == 'train')
        warmups = [max(args.warmup, common.steps_to_fill(r.model) if phase == 'train' else 0)
                   for r in live]
        samples, kept = [[] for _ in live], [None] * len(live)

        def step(i):
            r = live[i]
            if r.error:
                return (math.nan,)
            try:
                times, kept[i] = (train_iteration(r.model, r.optim_wrapper, r.batch)
                                  if phase == 'train' else inference(r.model, r.batch))
            except Exception as exc:  # noqa: BLE001  (one failing method is a row, not the end)
                r.error = common.describe_error(exc, 300)
                return (math.nan,)
            samples[i].append(times)
            warm = ', warm-up' if len(samples[i]) <= warmups[i] else ''
            common.say(f'[{phase} {r.method.name}: {times[0]:.1f} s{warm}]')
            return times

        medians = common.median_times(range(len(live)), step, warmups, args.repeats)
        for r, values, timed, warmup, last in zip(live, medians, samples, warmups, kept):
            if not r.error:
                common.check_history_full(r.model)
                totals = [times[0] for times in timed[warmup:]]
                r.medians[phase], r.spreads[phase], r.last[phase] = (
                    values, (min(totals), max(totals)), last)


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
    else:
        result.memory = json.loads(lines[-1][len(MEMORY_MARK):])


def profile_training(model, optim_wrapper, batch):
    """Profile one training iteration. Returns its self CPU seconds by
    (component: the first part of the module's name, module class, pass:
    'forward', 'backward' or the optimizer's 'step'), as docs/benchmarks.md says."""
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
        """Returns (root event, innermost module range or None) of ``event``."""
        module, root = None, event
        while True:
            if module is None and root.name.startswith('module|'):
                module = root.name
            if root.cpu_parent is None:
                return root, module
            root = root.cpu_parent

    resolved = [(event, *owner(event)) for event in prof.events()]
    by_sequence, totals = {}, Counter()
    for event, root, module in resolved:
        if module and event.sequence_nr >= 0 and not root.name.startswith('autograd::'):
            by_sequence.setdefault(event.sequence_nr, module)
    for event, root, module in resolved:
        if root.name.startswith('Optimizer.'):
            key = ('optimizer', 'SGD step + zero_grad', 'step')
        elif root.name.startswith('autograd::'):
            label = by_sequence.get(root.sequence_nr)
            key = (*(label.split('|')[1:] if label else ('other', 'outside modules')), 'backward')
        else:
            key = (*(module.split('|')[1:] if module else ('other', 'outside modules')), 'forward')
        totals[key] += event.self_cpu_time_total / 1e6
    return totals


def profile_tables(profiles):
    """Returns the lines of the tables of ``profiles`` (method name ->
    ``profile_training``), by component and by module class (and pass)."""
    names = list(profiles)
    lines = []
    for title, part in (('component', 0), ('module class', 1)):
        sums = {name: Counter() for name in names}
        for name, totals in profiles.items():
            for key, seconds in totals.items():
                sums[name][key[part], key[2]] += seconds
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


def table(results, skip_memory):
    """Returns the main table's lines: one row per method, ratios to FrozenBN."""
    base = next(r for r in results if r.method.key == BASELINE)
    header = ['method', 'config', 'train ms (min-max)', 'train x',
              'forward / backward / step ms', 'inference ms (min-max)', 'inference x',
              'detections', 'last loss', 'train peak MB', 'train memory x', 'inference peak MB',
              'inference memory x']

    def spread(r, phase):
        low, high = r.spreads[phase]
        return f'{fmt_ms(r.time(phase))} ({fmt_ms(low)}-{fmt_ms(high)})'

    rows = []
    for r in results:
        cells = [r.method.name, r.method.config + VARIANTS[r.method.variant]]
        if r.error:
            rows.append(common.not_measured(cells, r.error, len(header)))
            continue
        trained = 'train' in r.medians
        cells += ([spread(r, 'train'), fmt_ratio(ratio(r.time('train'), base.time('train'))),
                   ' / '.join(fmt_ms(t) for t in r.medians['train'][1:])] if trained else ['-'] * 3)
        cells += [spread(r, 'inference'), fmt_ratio(ratio(r.time('inference'),
                                                          base.time('inference'))),
                  str(r.last['inference']), f'{r.last["train"]:.3f}' if trained else '-']
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


def report(results, args, argv, loads, fold_check, profiles):
    """Returns the lines of the run's markdown: its settings, the tables and the profiles."""
    import mmcv
    import mmdet
    h, w = image_size(args.scale)
    by_key = {r.method.key: r for r in results if not r.error}
    names = {m.key: m.name for m in METHODS}
    pairs = [[f'{names[key]} / {names[base]}', phase,
              fmt_ratio(ratio(by_key[key].time(phase), by_key[base].time(phase))
                        if key in by_key and base in by_key else math.nan)]
             for key, base, phase in PAIRS]
    lines = [
        '# Model benchmark: Mask R-CNN R-50-FPN per method, training iteration and inference',
        '',
        f'Command: `{" ".join(["python tools/benchmark_models.py", *argv])}`  ',
        f'torch {torch.__version__}, mmdet {mmdet.__version__}, mmcv {mmcv.__version__}, CPU, '
        f'{torch.get_num_threads()} thread(s). Load average (1, 5, 15 min) on {os.cpu_count()} '
        f'CPUs: {loads[0]} at the start, {loads[1]} at the end.',
        '',
        f'Inputs: the same 2 synthetic images of {h}x{w} (scale {args.scale} of {IMAGE[0]}x'
        f'{IMAGE[1]}), {GT_PER_IMAGE} boxes, labels and masks each; RoIs per image: '
        f'{scaled_count(512, args.scale)} sampled in training, {scaled_count(1000, args.scale)} '
        f'proposals and {scaled_count(100, args.scale)} detections at inference. Each time is '
        f'the median of {args.repeats} alternated rounds after {args.warmup} warm-up iterations '
        'per model; ratios are to FrozenBN; how each column is measured: docs/benchmarks.md.',
        '',
        *table(results, args.skip_memory),
        '', '## Ratios between methods', '',
        *markdown_table(['methods', 'phase', 'measured'], pairs).splitlines(),
    ]
    if fold_check is not None:
        lines += ['', 'The folded model and the no-norm model have the same modules and the '
                  'same parameter and buffer shapes: '
                  + ('yes.' if not fold_check else 'NO: ' + '; '.join(fold_check))]
    if profiles:
        lines += ['', '## Where the training time goes', '',
                  'One training iteration per method under torch.profiler, after the timed '
                  'rounds; what the rows hold: docs/benchmarks.md.', *profile_tables(profiles)]
    return lines


RATIO_COLUMNS = {'train': 'train x', 'inference': 'inference x',
                 'train memory': 'train memory x', 'inference memory': 'inference memory x'}


def ratios_from_markdown(markdown):
    """Returns, per method measured in the main table of ``report``'s markdown,
    {key of RATIO_COLUMNS: ratio to FrozenBN (nan: not measured)}."""
    return {row['method']: {key: common.read_ratio(row[column])
                            for key, column in RATIO_COLUMNS.items()}
            for row in common.find_table(markdown, ('method',))
            if not row['train ms (min-max)'].startswith('not measured')}


def plot(markdown, path):
    """Write to ``path`` the bars of the time ratios (and memory ratios, when
    measured) per method in the table of ``markdown``, training and inference."""
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
    for r in results:
        try:
            r.model, r.optim_wrapper = build(r.method, args.scale)
            r.batch = make_batch(args.scale)
        except Exception as exc:  # noqa: BLE001  (one failing method is a row, not the end)
            r.error = common.describe_error(exc, 300)
    if results[0].error:  # the baseline, FrozenBN, must build
        raise RuntimeError(f'the baseline FrozenBN could not be built: {results[0].error}')
    built = {r.method.key: r for r in results if not r.error}
    fold_check = None
    if 'mabn-fused' in built and 'no-norm' in built:
        fold_check = architecture_differences(built['mabn-fused'].model, built['no-norm'].model)
    common.say(f'[built {len(built)} models; timing]')
    measure_times(results, args)
    profiles = {r.method.name: profile_training(r.model.train(), r.optim_wrapper, r.batch)
                for r in results if args.profile and r.method.key in PROFILED and not r.error}
    for r in results:
        r.model = r.optim_wrapper = None  # free their memory for the memory subprocesses
        if not (args.skip_memory or r.error):
            common.say(f'[memory of {r.method.name}]')
            measure_memory(r, args)
    return common.publish(report(results, args, argv, (start_load, common.load_average()),
                                 fold_check, profiles), args.out, plot)
