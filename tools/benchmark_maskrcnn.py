"""One training iteration of torchvision's Mask R-CNN R-50-FPN per normalization method.

    python tools/benchmark_maskrcnn.py [--methods BN CBN ...] [--dtype bfloat16]
        [--no-compile | --compile-methods ...] [--out docs/maskrcnn_benchmark.md]
    python tools/benchmark_maskrcnn.py --smoke    # tiny, on the CPU too

Needs torch, torchvision and mmengine (no mmcv, no mmdet). What is measured
and how: docs/benchmarks.md (code: mmnorm/benchmark/maskrcnn.py).
"""
import argparse
import sys

import torch

from mmnorm.benchmark import maskrcnn
from mmnorm.benchmark.common import HelpFormatter


def method_names(p, option, names):
    """``names`` as METHODS keys (case, spaces ignored), or a parser error."""
    known = {key.lower().replace(' ', ''): key for key in maskrcnn.METHODS}
    unknown = [n for n in names if n.lower().replace(' ', '') not in known]
    if unknown:
        p.error(f'{option}: unknown methods {unknown}; choose from {list(maskrcnn.METHODS)}')
    return [known[n.lower().replace(' ', '')] for n in names]


def parse_args(argv):
    methods = list(maskrcnn.METHODS)
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=HelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='torch device (cuda when available)')
    p.add_argument('--methods', nargs='+', default=methods, metavar='METHOD',
                   help='methods to measure (case and spaces ignored, e.g. mabn+cenconv); '
                   f'{maskrcnn.FROZEN!r}, the baseline of the ratios, is always measured')
    p.add_argument('--iters', type=int, default=10, help='timed iterations per method (median)')
    p.add_argument('--warmup', type=int, default=3,
                   help='untimed iterations first (CBN: at least until its history is full)')
    p.add_argument('--image-size', type=int, nargs=2, default=[800, 1333], metavar=('H', 'W'),
                   help='size of every input image (the model does not resize it)')
    p.add_argument('--images', type=int, default=2, help='images per batch')
    p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                   help='bfloat16: torch.autocast around the forward')
    p.add_argument('--compile', action=argparse.BooleanOptionalAction, default=True,
                   help='also measure with the backbone + FPN under torch.compile')
    p.add_argument('--compile-methods', nargs='+', default=methods, metavar='METHOD',
                   help=f'the methods that get the compiled column ({maskrcnn.FROZEN!r} '
                   'always does, with --compile)')
    p.add_argument('--smoke', action='store_true',
                   help=f'tiny run of the same code: {maskrcnn.SMOKE} (overriding those '
                   'options), compile backend aot_eager instead of inductor')
    p.add_argument('--out', help='also write the markdown to this file')
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.images < 1 or min(args.image_size) < 32:
        p.error('--iters must be >= 1, --warmup >= 0, --images >= 1, --image-size sides >= 32')
    args.methods = method_names(p, '--methods', args.methods)
    args.compile_methods = method_names(p, '--compile-methods', args.compile_methods)
    return args


def main(argv=None):
    """Run the benchmark; print the markdown and return it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return maskrcnn.run(parse_args(argv), argv)


if __name__ == '__main__':
    main()
