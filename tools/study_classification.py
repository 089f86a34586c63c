"""The MABN paper's normalization-batch table, on Fashion-MNIST
classification at a scale two CPU cores can run.

The paper: Yan et al., "Towards Stabilizing Batch Statistics in Backward
Propagation of Batch Normalization", ICLR 2020; the results here:
docs/classification_study.md.

    python tools/study_classification.py        # 7 rows x 3 seeds

The recipe (model, training, schedules of each norm) is in the docstring of
mmnorm/studies/classification.py. Each finished run is stored as
``WORK_DIR/ROW_seedS.json`` and read back on the next call (``--retrain``
trains again). Writes ``OUT_DIR/classification_study.md`` and
``OUT_DIR/classification_study.png``.
"""
import argparse
import os
import os.path as osp

import torch

from mmnorm.studies.classification import ROWS, ordering_verdict, run_study

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--rows', nargs='+', choices=list(ROWS), default=list(ROWS))
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--steps', type=int, default=500,
                   help='SGD steps of 32 images (default 500: 16,000 images)')
    p.add_argument('--test-images', type=int, default=10000,
                   help='evaluate on the first N test images (default: all 10,000)')
    p.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs', 'study_classification'))
    p.add_argument('--out-dir', default=osp.join(ROOT, 'docs'))
    p.add_argument('--data-root', default=None, help='Fashion-MNIST idx files '
                   '(default: /usr/share/datasets/fashion-mnist)')
    p.add_argument('--retrain', action='store_true')
    return p.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
    summary = run_study(args.rows, args.seeds, args.steps, args.test_images, args.work_dir,
                        args.out_dir, args.data_root, args.retrain)
    print(ordering_verdict(summary))
    print(f'[study] wrote {osp.join(args.out_dir, "classification_study.md")}')


if __name__ == '__main__':
    main()
