"""Install mmcv with its compiled ops, built for the torch of this Python.

    python tools/install_mmcv.py 2.1.0 [--source SPEC] [--cache DIR]

mmcv's ops are compiled against one torch: a wheel built for another torch
installs but ``import mmcv.ops`` fails with ``undefined symbol``. pip's wheel
cache does not know that, so this script builds the wheel itself (pip's cache
off) and keeps it under ``DIR/<key>/``, the key naming the torch version, its
CUDA version, whether mmcv's CUDA ops are compiled (a GPU is visible or
FORCE_CUDA=1) and the Python tag (e.g. ``torch2.1.2+cu121-cuda12.1-cpuops-cp311``).
Steps:

1. mmcv VERSION installed and ``import mmcv.ops`` works: nothing to do.
2. a kept wheel for this key: install it, then check ``import mmcv.ops``.
3. otherwise, or when that check fails (the message says why): build the
   wheel from SPEC (default ``mmcv==VERSION``, the sdist; MMCV_WITH_OPS=1,
   no build isolation, so it compiles against the installed torch), install
   it and check again; a failure then is an error (exit 1).

Uses only the standard library: it runs before anything else is installed
beside torch. DIR defaults to ``$XDG_CACHE_HOME/mmnorm/mmcv-wheels``.
"""
import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

# mmcv compiles its CUDA ops where torch sees a GPU or FORCE_CUDA=1 is set (its setup.py)
KEY_SCRIPT = ('import os, sys, torch; '
              'ops = "cuda" if torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1" '
              'else "cpu"; '
              'print(f"torch{torch.__version__}-cuda{torch.version.cuda or \'none\'}-{ops}ops'
              '-cp{sys.version_info[0]}{sys.version_info[1]}")')
CHECK_SCRIPT = ('import sys; from importlib.metadata import version; import mmcv.ops; '
                'sys.exit(0 if version("mmcv") == sys.argv[1] else 3)')


def say(message):
    print(f'[mmnorm setup] {message}', flush=True)


def default_cache():
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(Path.home(), '.cache')
    return Path(base) / 'mmnorm' / 'mmcv-wheels'


def wheel_key(python):
    """The torch version, CUDA version, kind of ops and Python tag of ``python``."""
    return subprocess.run([python, '-c', KEY_SCRIPT], check=True, capture_output=True,
                          text=True).stdout.strip()


def mmcv_problem(python, version):
    """None when mmcv ``version`` is installed and ``import mmcv.ops`` works,
    else the reason in one line."""
    result = subprocess.run([python, '-c', CHECK_SCRIPT, version], capture_output=True, text=True)
    if result.returncode == 0:
        return None
    if result.returncode == 3:
        return f'another mmcv version than {version} is installed'
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else f'exit status {result.returncode}'


def pip_install_wheel(python, wheel):
    """Install ``wheel`` in place of any installed mmcv (same version
    included), then whichever of its dependencies are missing."""
    command = [python, '-m', 'pip', 'install', '--disable-pip-version-check']
    subprocess.run(command + ['--no-deps', '--force-reinstall', str(wheel)], check=True)
    subprocess.run(command + [str(wheel)], check=True)


def build_wheel(python, source, directory):
    """Build ``source`` into ``directory`` against the installed torch."""
    directory.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MMCV_WITH_OPS='1', MAX_JOBS=os.environ.get('MAX_JOBS', '2'))
    subprocess.run([python, '-m', 'pip', 'wheel', '--disable-pip-version-check', '--no-deps',
                    '--no-build-isolation', '--no-cache-dir', '--no-binary', 'mmcv',
                    '-w', str(directory), source], check=True, env=env)


def kept_wheel(directory, version):
    wheels = sorted(directory.glob(f'mmcv-{version}-*.whl'))
    return wheels[-1] if wheels else None


def install_mmcv(python, version, source, cache):
    """Make ``import mmcv.ops`` work in ``python`` with mmcv ``version``;
    returns what was done: 'present', 'kept wheel' or 'built'."""
    problem = mmcv_problem(python, version)
    if problem is None:
        say(f'mmcv {version} with compiled ops is installed')
        return 'present'
    key = wheel_key(python)
    directory = Path(cache) / key
    wheel = kept_wheel(directory, version)
    if wheel is not None:
        say(f'installing mmcv {version} built earlier for {key}: {wheel}')
        pip_install_wheel(python, wheel)
        problem = mmcv_problem(python, version)
        if problem is None:
            return 'kept wheel'
        say(f'that wheel does not work here ({problem}); removing it and rebuilding')
        shutil.rmtree(directory)
    elif "No module named 'mmcv'" not in problem:
        say(f'the installed mmcv is not usable here ({problem}); building one for {key}')
    say(f'building mmcv {version} with its compiled ops for {key}: about 10-20 minutes on '
        f'2 cores, once per torch version (the wheel is kept in {directory})')
    build_wheel(python, source, directory)
    pip_install_wheel(python, kept_wheel(directory, version))
    problem = mmcv_problem(python, version)
    if problem is not None:
        sys.exit(f'error: mmcv {version} built for {key} still fails to import: {problem}')
    return 'built'


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('version', help='the mmcv version, e.g. 2.1.0')
    parser.add_argument('--source', help='what pip builds (default: mmcv==VERSION from PyPI)')
    parser.add_argument('--cache', type=Path, default=default_cache(),
                        help='where built wheels are kept, one folder per torch '
                        '(default: %(default)s)')
    parser.add_argument('--python', default=sys.executable,
                        help='the interpreter to install into (default: this one)')
    args = parser.parse_args()
    try:
        install_mmcv(args.python, args.version, args.source or f'mmcv=={args.version}', args.cache)
    except subprocess.CalledProcessError as error:
        sys.exit(f'error: mmcv {args.version} could not be installed: {" ".join(error.cmd)} '
                 f'exited with status {error.returncode} (its output is above)')


if __name__ == '__main__':
    main()
