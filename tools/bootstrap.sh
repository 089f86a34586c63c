#!/usr/bin/env bash
# One entry point for the README's commands:
#   bash tools/bootstrap.sh main                  set up, then train the main job on the embedded data
#   bash tools/bootstrap.sh test                  set up, then run the test suite
#   bash tools/bootstrap.sh --stack torch2.1 test the same on the users' stack
#   bash tools/bootstrap.sh [--stack S] setup     set up only
#   bash tools/bootstrap.sh workers               print the test command's worker count
# Stacks (exact pins in requirements/):
#   default   .venv: torch 2.13.0 CPU (or the torch python3 already has), requirements/openmmlab.txt
#   torch2.1  .venv-torch2.1: torch 2.1.2 and torchvision 0.16.2 from PyPI, the same OpenMMLab pins
# Set-up is idempotent. mmcv is built from source once per torch version and kept
# (tools/install_mmcv.py): a wheel built for another torch is never installed.
set -euo pipefail

ROOT="$(cd -P "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQ="$ROOT/requirements"
PYTHON_BASE="${PYTHON:-python3}"
STACK=default
if [ "${1:-}" = "--stack" ]; then
    STACK="${2:-}"
    shift 2 || true
fi
case "$STACK" in
    default) VENV="${MMNORM_VENV:-$ROOT/.venv}" ;;
    torch2.1) VENV="${MMNORM_VENV:-$ROOT/.venv-torch2.1}" ;;
    *) echo "unknown stack '$STACK' (default or torch2.1)" >&2; exit 2 ;;
esac

say() { printf '[mmnorm setup] %s\n' "$*"; }
elapsed() { printf '%d min %02d s' $(($1 / 60)) $(($1 % 60)); }
# MMNORM_PHASE_LOG (set by .ci/run): a file that gets one "stack phase seconds" line per
# phase; kept from the tests' own runs of this script.
PHASE_LOG="${MMNORM_PHASE_LOG:-}"
unset MMNORM_PHASE_LOG
phase() { [ -z "$PHASE_LOG" ] || echo "$STACK $1 $2" >> "$PHASE_LOG"; }
# MMNORM_SETUP_LOG (set by .ci/run): a file that gets a copy of the set-up's output
# (stdout and stderr), so that CI can fail on pip's ERROR lines; kept from the tests' runs.
SETUP_LOG="${MMNORM_SETUP_LOG:-}"
unset MMNORM_SETUP_LOG

# The test command's pytest-xdist workers: MMNORM_TEST_WORKERS, else one per core this
# process may use (its CPU affinity, as under taskset or a container's cpuset). Not nproc:
# it honours OMP_NUM_THREADS, so with OMP_NUM_THREADS=1 in the environment it prints 1.
test_workers() {
    local python="$VENV/bin/python"
    [ -x "$python" ] || python="$PYTHON_BASE"
    echo "${MMNORM_TEST_WORKERS:-$("$python" -c 'import os; print(len(os.sched_getaffinity(0)))')}"
}
if [ "${1:-}" = workers ]; then
    test_workers
    exit 0
fi

make_venv() {
    if [ -x "$VENV/bin/python" ]; then
        say "reusing virtual environment $VENV"
    elif [ "$STACK" = default ] && "$PYTHON_BASE" -c 'import torch' 2>/dev/null; then
        say "creating $VENV with access to the torch already installed for $PYTHON_BASE"
        "$PYTHON_BASE" -m venv --system-site-packages "$VENV"
    else
        say "creating virtual environment $VENV"
        "$PYTHON_BASE" -m venv "$VENV"
    fi
}

pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }

install_stack() {
    # setuptools, wheel and ninja for mmcv's source build, installed with torch so that pip
    # resolves them together: the setuptools that torch, mmcv's build and mmengine's
    # pkg_resources all accept differs per stack (the comments in the two files say why).
    local build="$REQ/build.txt"
    if [ "$STACK" = torch2.1 ]; then
        build="$REQ/build-torch2.1.txt"
        say "installing the torch 2.1 stack (torch 2.1.2 from PyPI, about 2.5 GB the first time)"
        pip_install -r "$REQ/torch2.1.txt" -r "$build"
    elif "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
        say "keeping torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
        pip_install -r "$build"
    else
        say "installing torch (CPU build)"
        pip_install -r "$REQ/torch-cpu.txt" -r "$build"
    fi
    if [ "$STACK" = default ] && ! "$VENV/bin/python" -c 'import triton' 2>/dev/null; then
        say "installing Triton (the fused kernels' tests and ahead-of-time compile)"
        pip_install -r "$REQ/triton.txt"
    fi
    say "installing the pinned packages (mmcv apart) and mmnorm (editable)"
    pip_install -r <(grep -v '^mmcv==' "$REQ/openmmlab.txt") -r "$REQ/tests.txt" -r "$build"
    # setup.py develop (an egg-link), not a PEP 660 editable wheel (pip's choice since
    # pyproject.toml exists): mmengine finds mmnorm/.mim, and so `mmnorm::` configs, only
    # through the egg-link's location (setup.py).
    pip_install --no-build-isolation --no-use-pep517 --no-deps -e "$ROOT"
    "$VENV/bin/python" "$ROOT/tools/install_mmcv.py" "$(sed -n 's/^mmcv==//p' "$REQ/openmmlab.txt")"
    pip_install -r "$REQ/openmmlab.txt"  # checks the whole stack, mmcv included
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

if [ -n "$SETUP_LOG" ]; then
    exec 3>&1 4>&2 > >(tee -a "$SETUP_LOG") 2>&1
    SETUP_TEE=$!
fi
make_venv
install_stack
ensure_fashion_mnist
export PATH="$VENV/bin:$PATH"
# PyTorch's OpenMP threads spin while waiting for each other; on a shared 2-core
# machine a descheduled thread then stalls every op (training steps ~5x slower here).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

say "set-up took $(elapsed $SECONDS)"
phase setup $SECONDS
if [ -n "$SETUP_LOG" ]; then
    exec 1>&3 2>&4 3>&- 4>&-
    wait "$SETUP_TEE" || true  # the copy is whole before anything else runs
fi

case "${1:-}" in
    main) shift; exec "$VENV/bin/python" "$ROOT/tools/main_job.py" "$@" ;;
    test) shift; cd "$ROOT"
        # One pytest-xdist worker per core; the tests that share a training are
        # kept on one worker (xdist_group). The torch 2.1 stack runs the
        # end-to-end tests marked every_stack only (docs/testing.md).
        SELECT=()
        [ "$STACK" = torch2.1 ] && SELECT=(-m 'not end_to_end or every_stack')
        start=$SECONDS
        status=0
        # The linter first (pyflakes, pycodestyle, import order: pyproject.toml); a finding
        # fails the run after the suite, so one run reports both.
        if [ "$STACK" = default ]; then
            "$VENV/bin/ruff" check "$ROOT" || status=$?
        fi
        "$VENV/bin/python" -m pytest -q -n "$(test_workers)" --dist loadgroup \
            --durations=15 "${SELECT[@]}" "$@" tests || status=$((status ? status : $?))
        printf '[mmnorm test] the suite took %s (pytest exit status %s)\n' \
            "$(elapsed $((SECONDS - start)))" "$status"
        phase suite $((SECONDS - start))
        exit $status ;;
    setup) say "done: activate the environment with  source ${VENV#"$ROOT"/}/bin/activate" ;;
    *) echo "usage: bash tools/bootstrap.sh [--stack default|torch2.1] {main|test|setup|workers} [args]" >&2
       exit 2 ;;
esac
