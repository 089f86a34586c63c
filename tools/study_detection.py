"""Issue 6, part 2: the demo Mask R-CNN on the Fashion-MNIST scenes with each
norm at 2 images per batch (and BN at 8 as the large-batch reference), the
same iteration budget for all.

    python tools/study_detection.py   # the 7 runs: 3 h 01 min of wall time in all here (shared machine)

Each row is one ``tools/train.py`` run of a config in ``configs/demo/`` under
``WORK_DIR/NAME``; box and mask AP are MMDetection's COCO metric on the 300
val scenes at the end of training. Writes ``OUT_DIR/detection_study.md``
(the table) and ``OUT_DIR/detection_study_loss.png`` (the training loss of
every row against the iteration). A row whose work dir already holds a
finished run is read back, not trained again, unless ``--retrain``.
"""
import argparse
import os
import os.path as osp
import subprocess
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
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


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs', 'study_detection'))
    p.add_argument('--out-dir', default=osp.join(ROOT, 'docs'),
                   help='where the table and the plot go (default: docs)')
    p.add_argument('--rows', nargs='+', choices=sorted(ROWS), default=list(ROWS),
                   help='which rows to run (default: all)')
    p.add_argument('--data-root', default=None,
                   help='an existing scenes directory (default: data/fmnist_scenes, '
                   'written first if missing)')
    p.add_argument('--retrain', action='store_true',
                   help='train every row again even if its work dir holds a finished run')
    p.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                   help='passed on to every tools/train.py run (for quick trials)')
    return p.parse_args()


def data_root_options(data_root):
    """--cfg-options that point every data key of the demo configs at
    ``data_root`` (the demo base derives them from its data_root when parsed)."""
    root = osp.abspath(data_root).rstrip('/') + '/'
    ann = root + 'annotations/instances_val.json'
    return [f'{split}_dataloader.dataset.data_root={root}' for split in ('train', 'val', 'test')] + [
        f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}']


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


def main():
    args = parse_args()
    from mmnorm.datasets import scenes
    from mmnorm.studies.results import last_record_with, logged_minutes, markdown_table, read_scalars
    cfg_options = list(args.cfg_options)
    if args.data_root is None:
        scenes.prepare(osp.join(ROOT, scenes.DEFAULT_OUT_DIR))
    else:
        cfg_options = data_root_options(args.data_root) + cfg_options

    table, curves = [], {}
    for name in args.rows:
        label, config_name, images = ROWS[name]
        work_dir = osp.join(osp.abspath(args.work_dir), name)
        records = None if args.retrain else read_scalars(work_dir)
        if last_record_with(records, METRICS) is None:
            train(osp.join(ROOT, 'configs', 'demo', config_name), work_dir, cfg_options)
            records = read_scalars(work_dir)
        result = last_record_with(records, METRICS)
        if result is None:
            sys.exit(f'[study] {name}: no {METRICS} in {work_dir}')
        iters, values = losses(records)
        curves[label] = (iters, values)
        table.append((label, images, max(iters, default=0),
                      f'{100 * result[METRICS[0]]:.1f}', f'{100 * result[METRICS[1]]:.1f}',
                      f'{logged_minutes(work_dir):.1f}'))
        print(f'[study] {label}: box AP {table[-1][3]}, mask AP {table[-1][4]}', flush=True)

    os.makedirs(args.out_dir, exist_ok=True)
    plot(curves, osp.join(args.out_dir, 'detection_study_loss.png'))
    header = ('norm (everywhere unless stated)', 'images per batch', 'iterations',
              'box AP', 'mask AP', 'train + eval time (min)')
    with open(osp.join(args.out_dir, 'detection_study.md'), 'w') as f:
        f.write('# Detection study: the demo Mask R-CNN on the Fashion-MNIST scenes\n\n'
                'Made by `python tools/study_detection.py` (one run per row, one seed, '
                'one thread each; COCO box / mask AP x 100 on the 300 val scenes; time '
                'is the wall time of training and evaluation from the run\'s log, on a '
                'machine shared with other jobs, so only a rough guide). '
                'ResNet-18 Mask R-CNN from scratch, configs in `configs/demo/`.\n\n')
        f.write(markdown_table(header, table))
        f.write('\n![training loss](detection_study_loss.png)\n')
    print(f'[study] wrote {osp.join(args.out_dir, "detection_study.md")}')


if __name__ == '__main__':
    main()
