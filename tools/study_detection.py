"""The demo Mask R-CNN on the Fashion-MNIST scenes with each norm at 2
images per batch (and BN at 8 as the large-batch reference), the same
iteration budget for all, 3 seeds, each model tested as trained and after
PreciseBN.

    python tools/study_detection.py   # 19 trainings and 19 tests

What each row runs and what is written: mmnorm/studies/detection.py.
"""
import argparse
import os.path as osp

from mmnorm.studies.detection import DEFAULT_SEEDS, ROOT, ROWS, run_study


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs', 'study_detection'))
    p.add_argument('--out-dir', default=osp.join(ROOT, 'docs'),
                   help='where the table and the plot go (default: docs)')
    p.add_argument('--rows', nargs='+', choices=sorted(ROWS), default=list(ROWS),
                   help='which rows to run (default: all)')
    p.add_argument('--seeds', nargs='+', type=int, default=DEFAULT_SEEDS,
                   help='the seeds of each row; the 8-image reference row runs with the '
                   'first only (default: 0 1 2)')
    p.add_argument('--data-root', default=None,
                   help='an existing scenes directory (default: data/fmnist_scenes, '
                   'written first if missing)')
    p.add_argument('--retrain', action='store_true',
                   help='train and test every run again even if its work dir holds its result')
    p.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                   help='passed on to every tools/train.py and tools/test.py run (for quick '
                   'trials)')
    return p.parse_args()


def main():
    args = parse_args()
    run_study(args.rows, args.seeds, args.work_dir, args.out_dir, args.data_root, args.retrain,
              args.cfg_options)


if __name__ == '__main__':
    main()
