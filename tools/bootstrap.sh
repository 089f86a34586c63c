#!/usr/bin/env bash
# One entry point for both README commands:
#   bash tools/bootstrap.sh main   set up, then train the main job on the embedded data
#   bash tools/bootstrap.sh test   set up, then run the test suite
# Set-up is idempotent: a second run reuses .venv and pip's cache of the mmcv wheel.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MMNORM_VENV:-$ROOT/.venv}"
PYTHON_BASE="${PYTHON:-python3}"
REQ="$ROOT/requirements"

say() { printf '[mmnorm setup] %s\n' "$*"; }

make_venv() {
    if [ -x "$VENV/bin/python" ]; then
        say "reusing virtual environment $VENV"
        return
    fi
    if "$PYTHON_BASE" -c 'import torch' 2>/dev/null; then
        say "creating $VENV with access to the torch already installed for $PYTHON_BASE"
        "$PYTHON_BASE" -m venv --system-site-packages "$VENV"
    else
        say "creating virtual environment $VENV"
        "$PYTHON_BASE" -m venv "$VENV"
    fi
}

pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check "$@"; }

installed() { "$VENV/bin/python" - "$1" "$2" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if version(sys.argv[1]) == sys.argv[2] else 1)
PY
}

install_stack() {
    if "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
        say "keeping torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
    else
        say "installing torch (CPU build)"
        pip_install -q -r "$REQ/torch-cpu.txt"
    fi
    # After torch, and in a separate call: torch 2.13 asks for setuptools >= 77.0.3, which pip
    # cannot resolve together with mmcv's setuptools<70; the old setuptools is what mmcv's build
    # and mmengine's pkg_resources need, and torch only uses setuptools to build extensions.
    pip_install -q -r "$REQ/build.txt"
    if installed mmcv 2.1.0 && "$VENV/bin/python" -c 'import mmcv.ops' 2>/dev/null; then
        say "mmcv 2.1.0 with compiled ops is installed"
    else
        say "building mmcv 2.1.0 with its compiled ops from source:"
        say "  this takes about 20 minutes on 2 cores the first time; pip caches the wheel afterwards"
        MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-2}" \
            pip_install --no-build-isolation -r "$REQ/runtime.txt" -r "$REQ/tests.txt" -r "$REQ/build.txt"
    fi
    say "installing the remaining pinned packages and mmnorm (editable)"
    pip_install -q -r "$REQ/runtime.txt" -r "$REQ/tests.txt" -r "$REQ/build.txt"
    pip_install -q --no-build-isolation --no-deps -e "$ROOT"
}

ensure_fashion_mnist() {
    local dir=/usr/share/datasets/fashion-mnist
    if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
        say "Fashion-MNIST found in $dir"
        return
    fi
    local cmd="apt-get update && apt-get install -y dataset-fashion-mnist"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing Debian's dataset-fashion-mnist"
        apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null
    else
        say "Fashion-MNIST is missing; run as root:  $cmd"
        exit 1
    fi
}

make_venv
install_stack
ensure_fashion_mnist
export PATH="$VENV/bin:$PATH"
# PyTorch's OpenMP threads spin while waiting for each other; on a shared 2-core
# machine a descheduled thread then stalls every op (training steps ~5x slower here).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

case "${1:-}" in
    main) shift; exec "$VENV/bin/python" "$ROOT/tools/main_job.py" "$@" ;;
    test) shift; cd "$ROOT"; exec "$VENV/bin/python" -m pytest -q "$@" tests ;;
    setup) say "done" ;;
    *) echo "usage: bash tools/bootstrap.sh {main|test|setup} [args]" >&2; exit 2 ;;
esac
