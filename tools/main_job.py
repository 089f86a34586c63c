"""The project's main job: ``bash tools/bootstrap.sh main [--work-dir DIR]
[--cfg-options k=v ...]``.

1. Prepares the Fashion-MNIST scenes under data/fmnist_scenes (once; see
   mmnorm/datasets/scenes.py).
2. Trains the MABN + CenConv demo Mask R-CNN (configs/demo/mask_rcnn_r18_mabn.py)
   through tools/train.py, which logs iteration, loss and ETA as it goes and
   evaluates with MMDetection's COCO metric at the end.
3. Predicts on the first few validation scenes (tools/test.py --out, no
   metric) and draws them next to their ground truth into
   WORK_DIR/predictions.png; plots the training loss into WORK_DIR/loss.png
   (mmnorm/studies/pictures.py).
4. Prints what was trained, for how long, the box and mask AP it measured
   (read back from the ``scalars.json`` mmengine wrote) and where the
   pictures are. When the model predicted nothing on the validation scenes
   (MMDetection then computes no AP), it says so in a WARNING line and counts
   the AP as 0.
Exit status: the failing tool's, 1 if the run left no AP, else 0.
"""
import argparse
import os.path as osp
import re
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(ROOT, 'configs', 'demo', 'mask_rcnn_r18_mabn.py')
METRICS = ('coco/bbox_mAP', 'coco/segm_mAP')
MODEL = 'MABN + CenConv Mask R-CNN (ResNet-18, from scratch)'
NUM_DRAWN = 6
SCORE_THR = 0.3  # lowest score of a prediction drawn
#: What MMDetection's CocoMetric logs when no image has a detection (it then computes no AP).
NOTHING_PREDICTED = 'The testing results of the whole dataset is empty'
EVALUATED = re.compile(r'Iter\(val\) \[\d+/(\d+)\]')


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs', 'main_job'),
                   help='work dir of the run (default: work_dirs/main_job)')
    p.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                   help='passed on to tools/train.py and tools/test.py')
    return p.parse_args()


def run(cmd):
    print('[main job] ' + ' '.join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc != 0:
        print(f'[main job] {osp.basename(cmd[1])} failed with exit status {rc}', file=sys.stderr)
        sys.exit(rc)


def describe_scenes(prepared, seconds):
    """Human lines about the data set :func:`scenes.prepare` returned."""
    train, val = prepared['train'], prepared['val']
    how = (f'written in {seconds:.0f} s' if train['written'] or val['written']
           else 'already prepared')
    return [f'[main job] Fashion-MNIST scenes in {osp.dirname(train["image_dir"])} ({how}):',
            f'[main job]   {train["num_images"]} training scenes with '
            f'{train["num_annotations"]} garments, {val["num_images"]} validation scenes with '
            f'{val["num_annotations"]} garments']


def main():
    args = parse_args()
    from mmengine.config import Config

    from mmnorm.datasets import scenes
    from mmnorm.studies import pictures
    from mmnorm.studies.results import last_record_with, newest_log, read_scalars
    start = time.time()
    prepared = scenes.prepare(osp.join(ROOT, scenes.DEFAULT_OUT_DIR))
    print('\n'.join(describe_scenes(prepared, time.time() - start)), flush=True)

    work_dir = osp.abspath(args.work_dir)
    start = time.time()
    train = [sys.executable, osp.join(ROOT, 'tools', 'train.py'), CONFIG, '--work-dir', work_dir]
    run(train + (['--cfg-options', *args.cfg_options] if args.cfg_options else []))
    minutes = (time.time() - start) / 60
    records = read_scalars(work_dir, start)
    log = newest_log(work_dir, start)
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        checkpoint = f.read().strip()
    iters = int(re.search(r'iter_(\d+)\.pth$', checkpoint).group(1))
    evaluated = EVALUATED.findall(log)
    scenes_evaluated = (f'{evaluated[-1]} validation scenes' if evaluated
                        else 'the validation scenes')
    result = last_record_with(records, METRICS)
    if result is None and NOTHING_PREDICTED in log:
        full_iters = Config.fromfile(CONFIG, import_custom_modules=False).max_iters
        cause = (f'Likely cause: too few iterations ({iters} trained; the demo trains '
                 f'{full_iters}).' if iters < full_iters else
                 f'It trained the demo\'s {iters} iterations: look at the training loss.')
        print(f'[main job] WARNING: the model predicted nothing on {scenes_evaluated} (no '
              'detection scored 0.05, MMDetection\'s threshold, or more), so MMDetection '
              f'computed no AP ("{NOTHING_PREDICTED}"); it counts as 0 here. {cause}',
              flush=True)
        result = dict.fromkeys(METRICS, 0.0)
    elif result is None:
        print(f'[main job] no {METRICS} found under {work_dir}', file=sys.stderr)
        sys.exit(1)

    drawing_dir = osp.join(work_dir, 'drawing_pass')
    predictions = osp.join(drawing_dir, 'predictions.pkl')
    run([sys.executable, osp.join(ROOT, 'tools', 'test.py'), CONFIG, checkpoint,
         '--work-dir', drawing_dir, '--out', predictions, '--cfg-options', *args.cfg_options,
         f'test_dataloader.dataset.indices={NUM_DRAWN}', 'test_evaluator=[]'])  # no metric
    what = f'{MODEL}, {iters} iterations'
    classes, drawn = pictures.load_drawn_scenes(predictions, prepared['val']['ann_file'], ROOT)
    grid_png, loss_png = osp.join(work_dir, 'predictions.png'), osp.join(work_dir, 'loss.png')
    pictures.draw_grid(drawn, classes, grid_png, SCORE_THR,
                       f'{what}: {len(drawn)} validation scenes')
    losses = [r for r in records or () if 'loss' in r and 'iter' in r]
    if losses:
        pictures.plot_loss(losses, loss_png, what)
    else:
        print('[main job] no loss curve: the run logged no training loss (mmengine logs every '
              'default_hooks.logger.interval iterations)')

    print(f'[main job] trained the {MODEL} on the Fashion-MNIST scenes for {iters} iterations: '
          f'{minutes:.1f} min of training and evaluation, {(time.time() - start) / 60:.1f} min '
          'in all')
    print(f'[main job] box AP {result[METRICS[0]]:.3f}, mask AP {result[METRICS[1]]:.3f} '
          f'(COCO metric, {scenes_evaluated})')
    print(f'[main job] predictions (score >= {SCORE_THR}) next to the ground truth on '
          f'{len(drawn)} validation scenes: {grid_png}')
    if losses:
        print(f'[main job] training loss: {loss_png}')


if __name__ == '__main__':
    main()
