"""Speed and memory of mmnorm's layers, each next to its baseline, in one run.

    python tools/benchmark_layers.py [--scale 0.5] [--repeats 5] [--threads N]
        [--layers MABN BRN ...] [--out docs/layer_benchmark.md]
    python tools/benchmark_layers.py --plot-from docs/layer_benchmark.md

What is measured, at which shapes and how: mmnorm/benchmark/layers.py.
"""
import argparse
import sys

import torch

from mmnorm.benchmark import layers


def parse_args(argv):
    names = [row.key for row in layers.ROWS]
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--scale', type=float, default=0.5,
                   help='image sides x scale, RoI counts x scale^2 (1: 800x1333, 512/128 '
                   'RoIs; default 0.5, a few minutes on 2 cores)')
    p.add_argument('--repeats', type=int, default=5,
                   help='at least this many timed samples per module and mode (median)')
    p.add_argument('--min-time', type=float, default=1.0,
                   help='and keep sampling until this many seconds per module and mode '
                   f'(at most {layers.MAX_ROUNDS} samples): cheap layers get many samples')
    p.add_argument('--warmup', type=int, default=2, help='untimed calls per module first')
    p.add_argument('--threads', type=int, help='torch.set_num_threads (default: torch\'s)')
    p.add_argument('--layers', nargs='+', metavar='NAME', help=f'a subset of {names}')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--out', help='also write the markdown to this file, and the plot as .png '
                   'next to it')
    p.add_argument('--plot-from', metavar='MD', help='only draw the plot (MD with .png) from '
                   'the table in MD, written by an earlier run')
    args = p.parse_args(argv)
    if args.scale <= 0 or args.repeats < 1 or args.warmup < 0 or args.min_time < 0:
        p.error('--scale must be > 0, --repeats >= 1, --warmup >= 0, --min-time >= 0')
    if args.layers:
        known = {name.lower(): name for name in names}
        unknown = [name for name in args.layers if name.lower() not in known]
        if unknown:
            p.error(f'unknown layers {unknown}; choose from {names}')
        args.layers = [known[name.lower()] for name in args.layers]
    return args


def main(argv=None):
    """Run the benchmark; print the markdown and return it (None with --plot-from)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return layers.run(parse_args(argv), argv)


if __name__ == '__main__':
    main()
