"""Plant each listed bug in a copy of the fused kernels, one at a time, and
check that the fused tests fail on it (docs/kernels.md, "Tests that catch a
wrong branch").

    python tools/mutation_check.py [--only NAME ...] [--workers N]

Each bug replaces one exact snippet of ``mmnorm/layers/*/kernels.py``; the
copy's tests (tests/layers/test_fused.py and test_fused_inputs.py, through
Triton's interpreter) run with ``-x`` and must fail. Prints one line per bug
and exits 1 if any bug passed every test. A kernel change that removes a
snippet fails tests/layers/test_kernels.py, so the list follows the kernels.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ['tests/layers/test_fused.py', 'tests/layers/test_fused_inputs.py']

# name -> (file under mmnorm/layers, exact snippet, replacement)
BUGS = {
    'mabn_lower_r_clip': ('mabn/kernels.py', 'tl.maximum(ratio, 1.0 / rmax)', 'ratio'),
    'mabn_upper_r_clip': ('mabn/kernels.py', 'tl.minimum(tl.maximum(ratio, 1.0 / rmax), rmax)',
                          'tl.maximum(ratio, 1.0 / rmax)'),
    'mabn_early_rule': ('mabn/kernels.py', 'early = (t <= M) | (t < warmup_iters)',
                        'early = t < warmup_iters'),
    'mabn_row_not_written': ('mabn/kernels.py', 'new.to(buffer_ptr.dtype.element_ty), mask=cmask & '
                             'owner)', 'new.to(buffer_ptr.dtype.element_ty), mask=cmask & False)'),
    'mabn_reads_written_running_var': ('mabn/kernels.py', 'tl.load(old_ptr + c, mask=cmask',
                                       'tl.load(running_var_ptr + c, mask=cmask'),
    'mabn_backward_window': ('mabn/kernels.py', 'psi = tl.where(early, psi_t, window)',
                             'psi = window'),
    'mabn_nonfinite_row': ('mabn/kernels.py', '_window(buffer_ptr, chi2, tl.where(present, finite, '
                           'False)', '_window(buffer_ptr, chi2, present'),
    'brn_d_clip': ('brn/kernels.py', 'tl.minimum(tl.maximum((mean - running_mean) / std_running, '
                   '-d_max), d_max)', '(mean - running_mean) / std_running'),
    'brn_lower_r_clip': ('brn/kernels.py', 'tl.maximum(std / std_running, 1.0 / r_max)',
                         'tl.maximum(std / std_running, 0.0)'),
    'brn_reads_written_mean': ('brn/kernels.py', 'running_mean = tl.load(old_ptr + c',
                               'running_mean = tl.load(running_mean_ptr + c'),
    'cbn_window_check': ('cbn/kernels.py', 'keep = stored & (ring_var >= 0) & (age < used)',
                         'keep = stored & (ring_var >= 0)'),
    'cbn_negative_variance': ('cbn/kernels.py', 'keep = stored & (ring_var >= 0) & (age < used)',
                              'keep = stored & (age < used)'),
    'cbn_share': ('cbn/kernels.py', 'tl.store(saved_ptr + 4 * C + c, 1.0 / count',
                  'tl.store(saved_ptr + 4 * C + c, 1.0 + 0.0 * count'),
    'cbn_push_counter': ('cbn/kernels.py', 'tl.store(pushes_ptr, pushes + 1, mask=first)',
                         'tl.store(pushes_ptr, pushes, mask=first)'),
    'cbn_compensation_rho': ('cbn/kernels.py', 'ring_mean = ring_mean + rho * tl.sum(mu_dot, 1)',
                             'ring_mean = ring_mean + tl.sum(mu_dot, 1)'),
    'shared_masked_shift': ('shared/kernels.py', 'x = tl.where(mask, x - shift, 0.0)\n'
                            '            first += x\n', 'x = x - shift\n            first += x\n'),
    'shared_last_chunk': ('shared/kernels.py', 'mask = (k < CHUNKS)[:, None]',
                          'mask = (k < CHUNKS - 1)[:, None]'),
    'shared_output_strides': ('shared/kernels.py', 'y_channel, cmask, L, y_stride_n, y_stride_l,',
                              'y_channel, cmask, L, stride_n, stride_l,'),
    'shared_chunk_end': ('shared/kernels.py', 'first + TILES_PER_CHUNK, N * per_sample',
                         'first + TILES_PER_CHUNK - 1, N * per_sample'),
    'shared_pooled_share': ('shared/kernels.py', 'dy_sum *= share\n            dy_xhat *= share',
                            'dy_sum *= 1.0\n            dy_xhat *= 1.0'),
    'shared_dweight_d_term': ('shared/kernels.py', '(r * dy_xhat + d * dy_sum).to(',
                              '(r * dy_xhat).to('),
}


def plant(tree, name):
    """Write bug ``name`` into the copy ``tree``; raise if its snippet is gone."""
    file, snippet, replacement = BUGS[name]
    path = tree / 'mmnorm' / 'layers' / file
    text = path.read_text()
    if text.count(snippet) != 1:
        raise SystemExit(f'{name}: the snippet is not in {file} exactly once: {snippet!r}')
    path.write_text(text.replace(snippet, replacement))


def run(name, workers):
    """(caught, seconds, the failing test or the summary) for bug ``name``."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / 'tree'
        shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
            '.venv*', '.git', '__pycache__', 'work_dirs', 'data', '*.egg-info'))
        plant(tree, name)
        env = dict(os.environ, PYTHONPATH=str(tree))
        start = time.time()
        done = subprocess.run([sys.executable, '-m', 'pytest', '-x', '-q', '-p',
                               'no:cacheprovider', '-n', str(workers), *TESTS], cwd=tree,
                              env=env, capture_output=True, text=True)
        failed = [line for line in done.stdout.splitlines() if line.startswith('FAILED')]
        lines = done.stdout.strip().splitlines()
        return bool(failed), time.time() - start, (failed or lines[-1:] or ['?'])[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--only', nargs='+', choices=sorted(BUGS), default=sorted(BUGS))
    parser.add_argument('--workers', type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    missed = []
    for name in args.only:
        caught, seconds, detail = run(name, args.workers)
        print(f'{"caught" if caught else "MISSED"} {name} ({seconds:.0f} s): {detail}',
              flush=True)
        if not caught:
            missed.append(name)
    print(f'{len(args.only) - len(missed)} of {len(args.only)} planted bugs caught')
    return 1 if missed else 0


if __name__ == '__main__':
    sys.exit(main())
