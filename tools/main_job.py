"""The project's main job: ``bash tools/bootstrap.sh main [--work-dir DIR]
[--cfg-options k=v ...]``.

1. Prepares the Fashion-MNIST scenes under data/fmnist_scenes (once; see
   mmnorm/datasets/scenes.py).
2. Trains the MABN + CenConv demo Mask R-CNN (configs/demo/mask_rcnn_r18_mabn.py)
   through tools/train.py, which logs iteration, loss and ETA as it goes and
   evaluates with MMDetection's COCO metric at the end.
3. Draws the predictions on a few validation images (MMDetection's visualizer,
   through tools/test.py --show-dir) into WORK_DIR/predictions.
4. Prints the box and mask AP the run measured, read back from the
   ``scalars.json`` mmengine wrote.
Exit status: the failing tool's, 1 if the run left no AP, else 0.
"""
import argparse
import os.path as osp
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(ROOT, 'configs', 'demo', 'mask_rcnn_r18_mabn.py')
METRICS = ('coco/bbox_mAP', 'coco/segm_mAP')
NUM_DRAWN = 6


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs', 'main_job'),
                   help='work dir of the run (default: work_dirs/main_job)')
    p.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                   help='passed on to tools/train.py')
    return p.parse_args()


def run(cmd):
    print('[main job] ' + ' '.join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc != 0:
        print(f'[main job] {osp.basename(cmd[1])} failed with exit status {rc}', file=sys.stderr)
        sys.exit(rc)


def main():
    args = parse_args()
    from mmnorm.datasets import scenes
    from mmnorm.studies.results import last_record_with, read_scalars
    start = time.time()
    written = scenes.prepare(osp.join(ROOT, scenes.DEFAULT_OUT_DIR))
    print(f'[main job] scenes ready in {time.time() - start:.0f} s: {written}', flush=True)

    work_dir = osp.abspath(args.work_dir)
    start = time.time()
    train = [sys.executable, osp.join(ROOT, 'tools', 'train.py'), CONFIG, '--work-dir', work_dir]
    run(train + (['--cfg-options', *args.cfg_options] if args.cfg_options else []))
    trained = time.time() - start
    result = last_record_with(read_scalars(work_dir, start), METRICS)
    if result is None:
        print(f'[main job] no {METRICS} found under {work_dir}', file=sys.stderr)
        sys.exit(1)

    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        checkpoint = f.read().strip()
    run([sys.executable, osp.join(ROOT, 'tools', 'test.py'), CONFIG, checkpoint,
         '--work-dir', osp.join(work_dir, 'drawn'), '--show-dir', osp.join(work_dir, 'predictions'),
         '--cfg-options', f'test_dataloader.dataset.indices={NUM_DRAWN}', *args.cfg_options])

    print(f'[main job] MABN + CenConv Mask R-CNN (ResNet-18) on the Fashion-MNIST scenes, '
          f'{trained / 60:.1f} min of training and evaluation')
    print(f'[main job] box AP {result[METRICS[0]]:.3f}, mask AP {result[METRICS[1]]:.3f} '
          f'(COCO metric, {scenes.NUM_VAL} validation scenes)')
    print(f'[main job] predictions drawn on {NUM_DRAWN} validation scenes under '
          f'{osp.join(work_dir, "predictions")}')


if __name__ == '__main__':
    main()
