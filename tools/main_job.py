"""The project's main job (``bash tools/bootstrap.sh main [--work-dir DIR]
[--cfg-options k=v ...]``).

For now: train ResNet-18 with BRN on Fashion-MNIST through ``tools/train.py``
(configs/fmnist/cls_r18_brn.py), then print the top-1 test accuracy that run
measured, read back from the ``scalars.json`` mmengine wrote in
``WORK_DIR/<timestamp>/vis_data/``. Exit status: train.py's if it failed, 1 if
the run left no accuracy, else 0.
"""
import argparse
import glob
import json
import os.path as osp
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(ROOT, 'configs', 'fmnist', 'cls_r18_brn.py')
METRIC = 'accuracy/top1'


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs', 'main_job'),
                   help='work dir of the run (default: work_dirs/main_job)')
    p.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                   help='passed on to tools/train.py')
    return p.parse_args()


def last_metric(work_dir, since):
    """(step, value) of the last ``METRIC`` in the newest scalars.json written
    under ``work_dir`` after time ``since``, or None."""
    files = [f for f in glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))
             if osp.getmtime(f) >= since]
    if not files:
        return None
    found = None
    with open(max(files, key=osp.getmtime)) as f:
        for line in f:
            record = json.loads(line)
            if METRIC in record:
                found = record.get('step'), record[METRIC]
    return found


def num_val_images(work_dir):
    """Size of the evaluated set, from the config the run dumped (None if unknown)."""
    dumped = osp.join(work_dir, osp.basename(CONFIG))
    try:
        from mmengine.config import Config
        dataset = Config.fromfile(dumped).val_dataloader.dataset
    except Exception:  # informative only
        return None
    return dataset.get('num_samples') or None


def main():
    args = parse_args()
    work_dir = osp.abspath(args.work_dir)
    cmd = [sys.executable, osp.join(ROOT, 'tools', 'train.py'), CONFIG, '--work-dir', work_dir]
    if args.cfg_options:
        cmd += ['--cfg-options', *args.cfg_options]
    print('[main job] ' + ' '.join(cmd), flush=True)
    start = time.time()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    wall = time.time() - start
    if rc != 0:
        print(f'[main job] tools/train.py failed with exit status {rc} after {wall:.0f} s',
              file=sys.stderr)
        sys.exit(rc)
    result = last_metric(work_dir, start)
    if result is None:
        print(f'[main job] no {METRIC} found in {work_dir}/*/vis_data/scalars.json',
              file=sys.stderr)
        sys.exit(1)
    step, acc = result
    n = num_val_images(work_dir)
    on = f'{n} Fashion-MNIST test images' if n else 'the Fashion-MNIST test set'
    print(f'[main job] trained {step} iterations in {wall:.0f} s (wall, incl. start-up); '
          f'top-1 accuracy on {on}: {acc:.2f} %', flush=True)


if __name__ == '__main__':
    main()
