"""Write the Fashion-MNIST scenes data set (COCO format) unless it is already there.

    python tools/prepare_scenes.py [--out data/fmnist_scenes] [--num-train 3000]
        [--num-val 300] [--seed 0] [--data-root /usr/share/datasets/fashion-mnist]

See mmnorm/datasets/scenes.py for the recipe. Running it again with the same arguments
does nothing (the parameters are stored in the JSON files).
"""
import argparse
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmnorm.datasets import scenes  # noqa: E402
from mmnorm.datasets.fashion_mnist import DEFAULT_DATA_ROOT  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default=osp.join(ROOT, scenes.DEFAULT_OUT_DIR),
                   help=f'output directory (default: {scenes.DEFAULT_OUT_DIR} in the '
                   'repository)')
    p.add_argument('--num-train', type=int, default=scenes.NUM_TRAIN,
                   help='train scenes, from the Fashion-MNIST training split '
                   '(default: %(default)s)')
    p.add_argument('--num-val', type=int, default=scenes.NUM_VAL,
                   help='val scenes, from the Fashion-MNIST test split (default: %(default)s)')
    p.add_argument('--seed', type=int, default=0, help='seed (default: %(default)s)')
    p.add_argument('--data-root', default=DEFAULT_DATA_ROOT,
                   help='directory of the Fashion-MNIST idx .gz files (default: %(default)s)')
    return p.parse_args()


def main():
    args = parse_args()
    try:
        results = scenes.prepare(args.out, num_train=args.num_train, num_val=args.num_val,
                                 seed=args.seed, data_root=args.data_root)
    except (FileNotFoundError, ValueError) as exc:
        print(f'[prepare_scenes] error: {exc}', file=sys.stderr)
        return 1
    for split in ('train', 'val'):
        r = results[split]
        if r['written']:
            print(f'[prepare_scenes] {split}: wrote {r["num_images"]} images with '
                  f'{r["num_annotations"]} instances to {r["image_dir"]} and {r["ann_file"]} '
                  f'in {r["seconds"]:.1f} s ({r["num_dropped"]} garments not placed)')
        else:
            print(f'[prepare_scenes] {split}: up to date, {r["num_images"]} images with '
                  f'{r["num_annotations"]} instances in {r["ann_file"]} (nothing written)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
