"""Compile mmnorm's fused Triton kernels for NVIDIA GPUs ahead of time, without a GPU.

    python tools/compile_kernels.py [--arch 80 90]

Every kernel variant the layers launch (modes, tiles, dtypes) is compiled to a
cubin for each compute capability (80: A100, 90: H100/H200), as Triton does on
a GPU at first use; a kernel such a GPU would refuse fails here. CI runs it.
"""
import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmnorm.layers.ahead_of_time import compile_ahead_of_time  # noqa: E402
from mmnorm.layers.paths import triton_problem  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', type=int, nargs='+', default=[80, 90],
                        help='compute capabilities, e.g. 80 90')
    args = parser.parse_args(argv)
    problem = triton_problem()
    if problem is not None:
        print(f'no kernel compiled: {problem}')
        return 1
    start = time.perf_counter()
    compiled = compile_ahead_of_time(args.arch)
    per_kernel = collections.Counter((name, arch) for name, arch, _ in compiled)
    for (name, arch), count in sorted(per_kernel.items()):
        print(f'{name}: {count} variants for sm_{arch}')
    print(f'compiled {len(compiled)} kernels for '
          f'{", ".join(f"sm_{a}" for a in args.arch)} in {time.perf_counter() - start:.1f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
