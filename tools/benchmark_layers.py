"""Speed and memory of mmnorm's layers, each next to its baseline, in one run.

    python tools/benchmark_layers.py [--scale 0.5] [--repeats 5] [--threads N]
        [--layers MABN BRN ...] [--out docs/layer_benchmark.md]
    python tools/benchmark_layers.py --device cuda --scale 1 --dtype float32 bfloat16 \\
        --memory-format contiguous channels_last [--shapes detection] [--compile]
    python tools/benchmark_layers.py --plot-from docs/layer_benchmark.md

What is measured, at which shapes and how: docs/benchmarks.md (code: mmnorm/benchmark/layers.py).
"""
import argparse
import sys

import torch

from mmnorm.benchmark import layers
from mmnorm.benchmark.common import MAX_ROUNDS, HelpFormatter


def parse_args(argv):
    names = [row.key for row in layers.ROWS]
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=HelpFormatter)
    p.add_argument('--scale', type=float, default=0.5,
                   help='image sides x scale, RoI counts x scale^2 (1: 800x1333, 512/128 '
                   'RoIs; 0.5 takes a few minutes on 2 cores)')
    p.add_argument('--shapes', choices=list(layers.SHAPE_SETS), default='default',
                   help='default: res2 stage, FPN P3, box head, mask head; detection: also the '
                   'stem (2x64x400x672 at --scale 1) and the res5 stage (2x2048x25x42)')
    p.add_argument('--repeats', type=int, default=5,
                   help='at least this many timed samples per module and mode (median)')
    p.add_argument('--min-time', type=float,
                   help='and keep sampling until this many seconds per module and mode '
                   f'(at most {MAX_ROUNDS} samples): cheap layers get many samples '
                   f'(default: {layers.MIN_TIME["cpu"]} on the CPU, {layers.MIN_TIME["cuda"]} '
                   'on CUDA)')
    p.add_argument('--warmup', type=int, default=2, help='untimed calls per module first')
    p.add_argument('--threads', type=int, help='torch.set_num_threads (default: torch\'s)')
    p.add_argument('--layers', nargs='+', metavar='NAME', help=f'a subset of {names} '
                   '(default: all)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='where to run: cpu, cuda or cuda:N (cuda where torch sees a GPU, '
                   'else cpu)')
    p.add_argument('--dtype', nargs='+', choices=layers.DTYPES, default=['float32'],
                   help='one set of rows per dtype; bfloat16: the forwards under '
                   'torch.autocast(device, bfloat16), input and modules float32')
    p.add_argument('--memory-format', nargs='+', choices=list(layers.MEMORY_FORMATS),
                   default=['contiguous'], help='one set of rows per memory format; '
                   'channels_last: input, incoming gradient and modules in torch.channels_last')
    p.add_argument('--compile', action='store_true',
                   help='also measure fwd+bwd of torch.compile(layer) and '
                   'torch.compile(baseline) (columns: compiled times, compiled / eager, '
                   'compiled layer / compiled baseline)')
    p.add_argument('--compile-backend', default='inductor',
                   help='torch.compile backend for --compile (aot_eager: no code generation)')
    p.add_argument('--out', help='also write the markdown to this file, and the plot as .png '
                   'next to it')
    p.add_argument('--plot-from', metavar='MD', help='only draw the plot (MD with .png) from '
                   'the table in MD, written by an earlier run')
    args = p.parse_args(argv)
    if args.min_time is None:
        args.min_time = layers.MIN_TIME.get(torch.device(args.device).type, 1.0)
    if args.scale <= 0 or args.repeats < 1 or args.warmup < 0 or args.min_time < 0:
        p.error('--scale must be > 0, --repeats >= 1, --warmup >= 0, --min-time >= 0')
    if torch.device(args.device).type == 'cuda' and not torch.cuda.is_available() and \
            not args.plot_from:
        p.error(f'--device {args.device}: torch {torch.__version__} sees no CUDA GPU')
    if args.layers:
        known = {name.lower(): name for name in names}
        unknown = [name for name in args.layers if name.lower() not in known]
        if unknown:
            p.error(f'unknown layers {unknown}; choose from {names}')
        args.layers = [known[name.lower()] for name in args.layers]
    args.dtype = list(dict.fromkeys(args.dtype))
    args.memory_format = list(dict.fromkeys(args.memory_format))
    return args


def main(argv=None):
    """Run the benchmark; print the markdown and return it (None with --plot-from)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return layers.run(parse_args(argv), argv)


if __name__ == '__main__':
    main()
