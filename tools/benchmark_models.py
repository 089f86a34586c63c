"""Speed and memory of whole Mask R-CNN R-50-FPN models, one per method, in one run.

    python tools/benchmark_models.py [--scale 1] [--repeats 5] [--warmup 2] [--threads 1]
        [--methods frozenbn mabn ...] [--skip-memory] [--profile] [--out docs/model_benchmark.md]
    python tools/benchmark_models.py --plot-from docs/model_benchmark.md

The models, inputs, timing, memory measurement and profile: docs/benchmarks.md (code:
mmnorm/benchmark/models.py).
"""
import argparse
import sys

from mmnorm.benchmark import models
from mmnorm.benchmark.common import HelpFormatter


def parse_args(argv):
    keys = [m.key for m in models.METHODS]
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=HelpFormatter)
    p.add_argument('--scale', type=float, default=1.0,
                   help=f'image sides x scale (1: {models.IMAGE[0]}x{models.IMAGE[1]}), RoI '
                   'counts x scale^2')
    p.add_argument('--repeats', type=int, default=5, help='timed rounds (median)')
    p.add_argument('--warmup', type=int, default=2, help='untimed iterations per model first')
    p.add_argument('--threads', type=int, default=1, help='torch.set_num_threads')
    p.add_argument('--methods', nargs='+', metavar='NAME',
                   help=f'a subset of {keys} (FrozenBN, the baseline, is always measured; '
                   'default: all)')
    p.add_argument('--skip-memory', action='store_true', help='leave the memory columns out')
    p.add_argument('--profile', action='store_true',
                   help='also profile a training iteration of FrozenBN, BN and MABN (where '
                   'the time goes, by model component and module class)')
    p.add_argument('--out', help='also write the markdown here, and the plot as .png next to it')
    p.add_argument('--plot-from', metavar='MD', help='only draw the plot (MD with .png) from '
                   'the table in MD, written by an earlier run')
    p.add_argument('--measure-memory-of', metavar='NAME', choices=keys,
                   help='internal: measure the memory of one method and print it')
    args = p.parse_args(argv)
    if args.scale <= 0 or args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        p.error('--scale must be > 0, --repeats >= 1, --warmup >= 0, --threads >= 1')
    wanted = {name.lower() for name in args.methods or keys}
    unknown = sorted(wanted - set(keys))
    if unknown:
        p.error(f'unknown methods {unknown}; choose from {keys}')
    args.methods = [m for m in models.METHODS if m.key in wanted or m.key == models.BASELINE]
    return args


def main(argv=None):
    """Run the benchmark; print the markdown and return it (None with --plot-from,
    the memory dict with --measure-memory-of)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return models.run(parse_args(argv), argv)


if __name__ == '__main__':
    main()
