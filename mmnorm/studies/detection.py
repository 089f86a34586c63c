"""The detection study: the demo Mask R-CNN on the Fashion-MNIST scenes with
each norm at 2 images per batch (and BN at 8 as the large-batch reference),
the same iteration budget for all (``tools/study_detection.py``).

Each row is one ``tools/train.py`` run of a config in ``configs/demo/`` under
``WORK_DIR/NAME``; box and mask AP are MMDetection's COCO metric on the 300
val scenes at the end of training. :func:`run_study` writes
``OUT_DIR/detection_study.md`` (the table) and
``OUT_DIR/detection_study_loss.png`` (the training loss of every row against
the iteration). A row whose work dir already holds a finished run is read
back, not trained again, unless ``retrain``.
"""
import os
import os.path as osp
import subprocess
import sys

from ..datasets import scenes
from .results import last_record_with, logged_minutes, markdown_table, read_scalars

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
METRICS = ('coco/bbox_mAP', 'coco/segm_mAP')
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


def data_root_options(data_root):
    """--cfg-options that point every data key of the demo configs at
    ``data_root`` (the demo base derives them from its data_root when parsed)."""
    root = osp.abspath(data_root).rstrip('/') + '/'
    ann = root + 'annotations/instances_val.json'
    loaders = [f'{split}_dataloader.dataset.data_root={root}'
               for split in ('train', 'val', 'test')]
    return loaders + [f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}']


def train(config, work_dir, cfg_options):
    """Run tools/train.py."""
    cmd = [sys.executable, osp.join(ROOT, 'tools', 'train.py'), config, '--work-dir', work_dir]
    if cfg_options:
        cmd += ['--cfg-options', *cfg_options]
    env = dict(os.environ)
    env.setdefault('OMP_NUM_THREADS', '1')  # one core per run: comparable timings
    print('[study] ' + ' '.join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if rc != 0:
        sys.exit(f'[study] {config} failed with exit status {rc}')


def losses(records):
    """(iterations, total training loss) of the logged training records."""
    train_records = [r for r in records if 'loss' in r and 'iter' in r]
    return [r['iter'] for r in train_records], [r['loss'] for r in train_records]


def plot(curves, path):
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (iters, values) in curves.items():
        ax.plot(iters, values, label=label, linewidth=1.2)
    ax.set_xlabel('iteration')
    ax.set_ylabel('training loss (sum of all heads, mean of 20 iterations)')
    ax.set_title('Demo Mask R-CNN on the Fashion-MNIST scenes')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_study(rows, work_dir, out_dir, data_root=None, retrain=False, cfg_options=()):
    """Train (or read back) each of ``rows`` (keys of :data:`ROWS`) and write
    the table and the loss plot to ``out_dir``; ``data_root`` an existing
    scenes directory (default: data/fmnist_scenes, written first if missing);
    ``cfg_options`` go to every tools/train.py run."""
    cfg_options = list(cfg_options)
    if data_root is None:
        scenes.prepare(osp.join(ROOT, scenes.DEFAULT_OUT_DIR))
    else:
        cfg_options = data_root_options(data_root) + cfg_options

    table, curves = [], {}
    for name in rows:
        label, config_name, images = ROWS[name]
        row_dir = osp.join(osp.abspath(work_dir), name)
        records = None if retrain else read_scalars(row_dir)
        if last_record_with(records, METRICS) is None:
            train(osp.join(ROOT, 'configs', 'demo', config_name), row_dir, cfg_options)
            records = read_scalars(row_dir)
        result = last_record_with(records, METRICS)
        if result is None:
            sys.exit(f'[study] {name}: no {METRICS} in {row_dir}')
        iters, values = losses(records)
        curves[label] = (iters, values)
        table.append((label, images, max(iters, default=0),
                      f'{100 * result[METRICS[0]]:.1f}', f'{100 * result[METRICS[1]]:.1f}',
                      f'{logged_minutes(row_dir):.1f}'))
        print(f'[study] {label}: box AP {table[-1][3]}, mask AP {table[-1][4]}', flush=True)

    os.makedirs(out_dir, exist_ok=True)
    plot(curves, osp.join(out_dir, 'detection_study_loss.png'))
    header = ('norm (everywhere unless stated)', 'images per batch', 'iterations',
              'box AP', 'mask AP', 'train + eval time (min)')
    with open(osp.join(out_dir, 'detection_study.md'), 'w') as f:
        f.write('# Detection study: the demo Mask R-CNN on the Fashion-MNIST scenes\n\n'
                'Made by `python tools/study_detection.py` (one run per row, one seed, '
                'one thread each; COCO box / mask AP x 100 on the 300 val scenes; time '
                'is the wall time of training and evaluation from the run\'s log, on a '
                'machine shared with other jobs, so only a rough guide). '
                'ResNet-18 Mask R-CNN from scratch, configs in `configs/demo/`.\n\n')
        f.write(markdown_table(header, table))
        f.write('\n![training loss](detection_study_loss.png)\n')
    print(f'[study] wrote {osp.join(out_dir, "detection_study.md")}')

