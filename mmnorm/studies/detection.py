"""The detection study: the demo Mask R-CNN on the Fashion-MNIST scenes with
each norm at 2 images per batch (and BN at 8 as the large-batch reference),
the same iteration budget for all, several seeds, and each trained model
evaluated twice: with the statistics training left, and after PreciseBN
(``tools/study_detection.py``).

Each (row, seed) is one ``tools/train.py`` run of a config in
``configs/demo/`` with ``randomness.seed=SEED`` under ``WORK_DIR/NAME/seedSEED``
(box and mask AP: MMDetection's COCO metric on the 300 val scenes at the end
of training), then one ``tools/test.py CHECKPOINT --precise-bn 200`` of its
last checkpoint under ``.../precise_bn`` (same weights, inference statistics
recomputed from 200 training batches). The 8-image reference row costs 4x a
2-image row and runs with the first seed only. :func:`run_study` writes
``OUT_DIR/detection_study.md`` (the table: mean and spread = max - min over the
seeds, and each run), ``OUT_DIR/detection_study_ap.png`` (every run's AP) and
``OUT_DIR/detection_study_loss.png`` (the training loss, mean over the seeds).
A run whose work dir already holds its result is read back, not run again,
unless ``retrain``.
"""
import glob
import json
import os
import os.path as osp
import re
import subprocess
import sys

import numpy as np

from ..datasets import scenes
from .results import last_record_with, logged_minutes, markdown_table, read_scalars

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
METRICS = ('coco/bbox_mAP', 'coco/segm_mAP')
PRECISE_BN_ITERS = 200
DEFAULT_SEEDS = [0, 1, 2]
#: name -> (label in the table, demo config, images per batch)
ROWS = {
    'bn': ('BN', 'mask_rcnn_r18_bn.py', 2),
    'frozenbn': ('frozen BN (backbone), no norm in neck/heads', 'mask_rcnn_r18_frozenbn.py', 2),
    'brn': ('BRN', 'mask_rcnn_r18_brn.py', 2),
    'mabn': ('MABN + CenConv', 'mask_rcnn_r18_mabn.py', 2),
    'cbn': ('CBN', 'mask_rcnn_r18_cbn.py', 2),
    'gnws': ('GN + WS', 'mask_rcnn_r18_gnws.py', 2),
    'bn_8img': ('BN, 8 images per batch (reference)', 'mask_rcnn_r18_bn_8img.py', 8),
}
REFERENCE_ROWS = ('bn_8img',)  # run with the first seed only
_RECOMPUTED = re.compile(r'PreciseBNHook \(before testing\): statistics of (\d+) layers')


def data_root_options(data_root):
    """--cfg-options that point every data key of the demo configs at
    ``data_root`` (the demo base derives them from its data_root when parsed)."""
    root = osp.abspath(data_root).rstrip('/') + '/'
    ann = root + 'annotations/instances_val.json'
    loaders = [f'{split}_dataloader.dataset.data_root={root}'
               for split in ('train', 'val', 'test')]
    return loaders + [f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}']


def run_tool(tool, args, cfg_options):
    """Run ``tools/TOOL`` with ``args`` and ``--cfg-options``; exit if it fails."""
    cmd = [sys.executable, osp.join(ROOT, 'tools', tool), *map(str, args)]
    if cfg_options:
        cmd += ['--cfg-options', *cfg_options]
    env = dict(os.environ)
    env.setdefault('OMP_NUM_THREADS', '1')  # one core per run: comparable timings
    print('[study] ' + ' '.join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if rc != 0:
        sys.exit(f'[study] {" ".join(cmd[1:3])} failed with exit status {rc}')


def test_metrics(work_dir):
    """(metrics, layers recomputed) of the newest tools/test.py run under
    ``work_dir`` (its ``TIMESTAMP/TIMESTAMP.json`` and ``.log``), or None."""
    found = sorted(glob.glob(osp.join(work_dir, '*', '*.json')), key=osp.getmtime)
    if not found:
        return None
    with open(found[-1]) as f:
        metrics = json.load(f)
    with open(found[-1][:-len('.json')] + '.log') as f:
        recomputed = _RECOMPUTED.search(f.read())
    if recomputed is None or not all(key in metrics for key in METRICS):
        return None
    return metrics, int(recomputed.group(1))


def run_row_seed(name, seed, work_dir, cfg_options, retrain):
    """Train (or read back) one run and its PreciseBN test: a dict with
    ``box``, ``mask``, ``precise_box``, ``precise_mask`` (AP x 100),
    ``layers`` (recomputed), ``minutes``, ``iters`` and ``loss``."""
    config = osp.join(ROOT, 'configs', 'demo', ROWS[name][1])
    run_dir = osp.join(osp.abspath(work_dir), name, f'seed{seed}')
    precise_dir = osp.join(run_dir, 'precise_bn')
    options = [f'randomness.seed={seed}', *cfg_options]
    records = None if retrain else read_scalars(run_dir)
    if last_record_with(records, METRICS) is None:
        run_tool('train.py', [config, '--work-dir', run_dir], options)
        records = read_scalars(run_dir)
        retrain = True  # a new checkpoint: test it again
    result = last_record_with(records, METRICS)
    if result is None:
        sys.exit(f'[study] {name} seed {seed}: no {METRICS} in {run_dir}')
    precise = None if retrain else test_metrics(precise_dir)
    if precise is None:
        with open(osp.join(run_dir, 'last_checkpoint')) as f:
            checkpoint = f.read().strip()
        run_tool('test.py', [config, checkpoint, '--precise-bn', PRECISE_BN_ITERS,
                             '--work-dir', precise_dir], options)
        precise = test_metrics(precise_dir)
    metrics, layers = precise
    train_records = [r for r in records if 'loss' in r and 'iter' in r]
    run = dict(box=100 * result[METRICS[0]], mask=100 * result[METRICS[1]],
               precise_box=100 * metrics[METRICS[0]], precise_mask=100 * metrics[METRICS[1]],
               layers=layers, minutes=logged_minutes(run_dir),
               iters=[r['iter'] for r in train_records], loss=[r['loss'] for r in train_records])
    print(f'[study] {name} seed {seed}: box AP {run["box"]:.1f}, mask AP {run["mask"]:.1f}; '
          f'after PreciseBN ({layers} layers) {run["precise_box"]:.1f}, '
          f'{run["precise_mask"]:.1f}', flush=True)
    return run


def _mean_spread(values):
    return f'{np.mean(values):.1f}', f'{np.max(values) - np.min(values):.1f}'


def plot_ap(results, path):
    """Every run's box and mask AP per row, with and without PreciseBN."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    names = list(results)
    for ax, metric, title in zip(axes, ('box', 'mask'), ('box AP', 'mask AP')):
        for i, name in enumerate(names):
            runs = results[name]
            plain = [r[metric] for r in runs]
            precise = [r['precise_' + metric] for r in runs]
            ax.scatter([i - 0.12] * len(plain), plain, color='tab:blue', s=18,
                       label='as trained' if i == 0 else None)
            ax.scatter([i + 0.12] * len(precise), precise, color='tab:orange', marker='D', s=16,
                       label=f'after PreciseBN ({PRECISE_BN_ITERS} batches)' if i == 0 else None)
            ax.hlines([np.mean(plain)], i - 0.25, i + 0.01, color='tab:blue')
            ax.hlines([np.mean(precise)], i - 0.01, i + 0.25, color='tab:orange')
        ticks = [f'{ROWS[n][0].split(",")[0].split(" (")[0]}\n{ROWS[n][2]} img' for n in names]
        ax.set_xticks(range(len(names)), ticks, fontsize=8)
        ax.set_title(f'{title} on the 300 val scenes (dots: seeds, lines: means)', fontsize=9)
        ax.grid(alpha=0.3, axis='y')
    axes[0].set_ylabel('COCO AP x 100')
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss(results, path):
    """The training loss of every row against the iteration, mean over seeds."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in results.items():
        length = min(len(r['loss']) for r in runs)
        loss = np.mean([r['loss'][:length] for r in runs], axis=0)
        ax.plot(runs[0]['iters'][:length], loss, label=ROWS[name][0], linewidth=1.2)
    ax.set_xlabel('iteration')
    ax.set_ylabel('training loss (all heads, mean of 20 iterations and of the seeds)')
    ax.set_title('Demo Mask R-CNN on the Fashion-MNIST scenes')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results, seeds, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    plot_ap(results, osp.join(out_dir, 'detection_study_ap.png'))
    plot_loss(results, osp.join(out_dir, 'detection_study_loss.png'))
    summary, runs = [], []
    for name, row_runs in results.items():
        label, _, images = ROWS[name]
        cells = [label, images, max(row_runs[0]['iters'], default=0), len(row_runs)]
        for metric in ('box', 'mask', 'precise_box', 'precise_mask'):
            cells += _mean_spread([r[metric] for r in row_runs])
        minutes = [r['minutes'] for r in row_runs if r['minutes'] is not None]
        summary.append(cells + [f'{np.mean(minutes):.1f}' if minutes else '-'])
        runs += [(label, seed, f'{r["box"]:.1f}', f'{r["mask"]:.1f}', f'{r["precise_box"]:.1f}',
                  f'{r["precise_mask"]:.1f}', r['layers'])
                 for seed, r in zip(seeds, row_runs)]
    header = ('norm (everywhere unless stated)', 'images per batch', 'iterations', 'seeds',
              'box AP', 'spread', 'mask AP', 'spread', 'box AP, PreciseBN', 'spread',
              'mask AP, PreciseBN', 'spread', 'train + eval time per run (min)')
    command = 'python tools/study_detection.py'
    if list(results) != list(ROWS):
        command += ' --rows ' + ' '.join(results)
    if list(seeds) != DEFAULT_SEEDS:
        command += ' --seeds ' + ' '.join(map(str, seeds))
    reference = (f'; the 8-image reference row: seed {seeds[0]} only'
                 if any(name in REFERENCE_ROWS for name in results) else '')
    with open(osp.join(out_dir, 'detection_study.md'), 'w') as f:
        f.write('# Detection study: the demo Mask R-CNN on the Fashion-MNIST scenes\n\n'
                f'Made by `{command}`. ResNet-18 Mask R-CNN from '
                'scratch, configs in `configs/demo/`, one thread per run. AP: COCO box / '
                'mask AP x 100 on the 300 val scenes, mean over the seeds '
                f'({", ".join(map(str, seeds))}{reference}), spread = max - min. "PreciseBN": '
                'the same checkpoint tested after '
                f'`tools/test.py --precise-bn {PRECISE_BN_ITERS}` recomputed the inference '
                'statistics of its BN-family layers from 200 training batches; rows with no '
                'such layer that trains (frozen BN, GN + WS) are unchanged by it. Time: wall '
                'time of training and evaluation from the run\'s log, on a machine shared '
                'with other jobs, so only a rough guide.\n\n')
        f.write(markdown_table(header, summary))
        f.write('\n![AP of every run](detection_study_ap.png)\n\n## Every run\n\n')
        f.write(markdown_table(('norm', 'seed', 'box AP', 'mask AP', 'box AP, PreciseBN',
                                'mask AP, PreciseBN', 'layers recomputed'), runs))
        f.write('\n![training loss](detection_study_loss.png)\n')
    print(f'[study] wrote {osp.join(out_dir, "detection_study.md")}')


def run_study(rows, seeds, work_dir, out_dir, data_root=None, retrain=False, cfg_options=()):
    """Train and test (or read back) each of ``rows`` (keys of :data:`ROWS`)
    with each of ``seeds`` (reference rows: the first), then write the tables
    and plots to ``out_dir``; ``data_root`` an existing scenes directory
    (default: data/fmnist_scenes, written first if missing); ``cfg_options``
    go to every tool run. Returns {row: [run dict per seed]}."""
    cfg_options = list(cfg_options)
    if data_root is None:
        scenes.prepare(osp.join(ROOT, scenes.DEFAULT_OUT_DIR))
    else:
        cfg_options = data_root_options(data_root) + cfg_options
    results = {name: [run_row_seed(name, seed, work_dir, cfg_options, retrain)
                      for seed in (seeds[:1] if name in REFERENCE_ROWS else seeds)]
               for name in rows}
    write_report(results, seeds, out_dir)
    return results
