#!/usr/bin/env bash
# The GPU check: CUDA tests, the layer benchmark and a Mask R-CNN iteration per method.
#   bash tools/gpu_check.sh --download DIR   on a machine with a package registry: fill DIR with
#                                            the pure-Python wheels the check needs (mmengine ...)
#   bash tools/gpu_check.sh [--wheels DIR] [--out DIR]
#                                            on a machine with one NVIDIA GPU whose python3 has a
#                                            CUDA torch and torchvision, no network: install from
#                                            DIR (default .gpu_wheels) into a temporary folder,
#                                            run, write DIR/gpu_*.md (default docs/)
#   bash tools/gpu_check.sh --smoke [--out DIR]
#                                            the same code path on tiny shapes, CPU allowed (CI)
# Each step has its own time limit, so a slow step cannot take the others' results with it.
set -uo pipefail

ROOT="$(cd -P "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="$ROOT/.gpu_wheels"
OUT_DIR="$ROOT/docs"
SMOKE=0
PACKAGES=(mmengine==0.10.7 addict==2.4.0 yapf==0.43.0 termcolor==3.1.0 platformdirs==4.3.8)

while [ $# -gt 0 ]; do
    case "$1" in
        --download)
            mkdir -p "$2"
            exec "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
                --implementation py --platform any -d "$2" "${PACKAGES[@]}" ;;
        --wheels) WHEELS="$2"; shift 2 ;;
        --out) OUT_DIR="$2"; shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        *) echo "unknown argument '$1' (see the comment at the top of $0)" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT_DIR"
say() { printf '[gpu check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

MISSING=()  # the wheels whose module this python cannot import
for wheel in "$WHEELS"/*.whl; do
    [ -e "$wheel" ] || continue
    "$PY" -c "import $(basename "$wheel" | cut -d- -f1)" 2>/dev/null || MISSING+=("$wheel")
done
if [ ${#MISSING[@]} -gt 0 ]; then
    SITE="$(mktemp -d)"
    say "installing $(printf '%s ' "${MISSING[@]##*/}")into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${MISSING[@]}" \
        || exit 1
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c 'import mmengine' || { say "mmengine is missing: run --download first"; exit 1; }
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$ROOT" || exit 1
"$PY" - <<'EOF'
import torch
device = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'
print('torch', torch.__version__, 'CUDA', torch.version.cuda,
      'cuDNN', torch.backends.cudnn.version(), 'device', device)
from mmnorm.layers import paths
print(paths.select())  # which path the layers take (the fused Triton kernels on CUDA)
EOF

FAILED=()
step() {  # step NAME SECONDS TABLE COMMAND...: TABLE (or -) must have no failed row
    local name="$1" limit="$2" table="$3"
    shift 3
    say "$name (at most ${limit} s)"
    local start=$SECONDS
    timeout "$limit" "$@"
    local status=$?
    say "$name: exit $status after $((SECONDS - start)) s"
    if [ $status -ne 0 ]; then
        FAILED+=("$name (exit $status)")
    elif [ "$table" != - ] && grep -qE 'not measured:|failed:' "$table"; then
        FAILED+=("$name (rows that failed in $table)")
    fi
}
# Why torchvision's Mask R-CNN cannot run with this torch, or nothing.
TORCHVISION_PROBLEM="$("$PY" - 2>&1 <<'EOF'
import torch
try:
    import torchvision
    torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
except Exception as error:
    print(f'{type(error).__name__}: {error}'.splitlines()[0])
EOF
)"

if [ $SMOKE = 1 ]; then
    DEVICE=cpu
    "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' && DEVICE=cuda
    # Without a GPU the CUDA tests' code runs on the CPU (MMNORM_CUDA_TESTS_ON_CPU=1), all of it
    # (71 tests, 1 to 2 min on 2 cores; else every test would skip). The layers take the ATen path
    # there (section 9's tests of the fused path skip, saying why): the fused kernels under
    # Triton's interpreter are tests/layers/test_fused*.py's (the CUDA tests that way,
    # MMNORM_KERNELS=triton TRITON_INTERPRET=1, take over 9 min here). -rs: each skip's reason
    # goes to the log.
    ON_CPU=0
    [ "$DEVICE" = cpu ] && ON_CPU=1
    step 'CUDA tests' 300 - env MMNORM_CUDA_TESTS_ON_CPU=$ON_CPU \
        "$PY" -m pytest -q -rs -p no:cacheprovider -m cuda tests/cuda
    # The layers compile whole from torch 2.4 (torch.library.custom_op).
    COMPILE=(--compile --compile-backend aot_eager) MASK_RCNN_COMPILE=()
    if ! "$PY" -c 'import sys, mmnorm.layers.operators as o; sys.exit(not o.CUSTOM_OPS)'; then
        say "no compiled columns (torch < 2.4: no torch.library.custom_op)"
        COMPILE=() MASK_RCNN_COMPILE=(--no-compile)
    fi
    step 'layer benchmark' 300 "$OUT_DIR/gpu_layer_benchmark.md" "$PY" tools/benchmark_layers.py \
        --device "$DEVICE" --scale 0.05 --repeats 1 --min-time 0 --warmup 1 \
        --layers MABN BRN WSConv --dtype float32 bfloat16 --memory-format contiguous \
        channels_last "${COMPILE[@]}" --out "$OUT_DIR/gpu_layer_benchmark.md"
    if [ -n "$TORCHVISION_PROBLEM" ]; then
        say "Mask R-CNN iteration: skipped, torchvision does not run with this torch" \
            "($TORCHVISION_PROBLEM)"
    else
        step 'Mask R-CNN iteration' 600 "$OUT_DIR/gpu_maskrcnn.md" \
            "$PY" tools/benchmark_maskrcnn.py --smoke --device "$DEVICE" "${MASK_RCNN_COMPILE[@]}" \
            --out "$OUT_DIR/gpu_maskrcnn.md"
    fi
else
    # The limits add up to 560 s: with the setup above, the check ends within 10 minutes.
    [ -z "$TORCHVISION_PROBLEM" ] || FAILED+=("torchvision: $TORCHVISION_PROBLEM")
    step 'CUDA tests' 120 - "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/cuda
    # Every row at the six detection shapes (stem and res5 beside the default four), fp32 and
    # bf16, both layouts: 240 measurements, each timed for --min-time (0.05 s) per module and
    # mode at least, plus Triton compiling each variant of the fused kernels at its first launch.
    step 'layer benchmark, eager' 190 "$OUT_DIR/gpu_layer_benchmark.md" \
        "$PY" tools/benchmark_layers.py --device cuda --scale 1 --shapes detection \
        --dtype float32 bfloat16 --memory-format contiguous channels_last \
        --out "$OUT_DIR/gpu_layer_benchmark.md"
    step 'Mask R-CNN iteration' 150 "$OUT_DIR/gpu_maskrcnn.md" \
        "$PY" tools/benchmark_maskrcnn.py --device cuda \
        --compile-methods 'frozen BN' 'MABN + CenConv' --out "$OUT_DIR/gpu_maskrcnn.md"
    step 'layer benchmark, compiled' 100 "$OUT_DIR/gpu_layer_benchmark_compiled.md" \
        "$PY" tools/benchmark_layers.py --device cuda --scale 1 --layers MABN BRN WSConv \
        --compile --out "$OUT_DIR/gpu_layer_benchmark_compiled.md"
fi
if [ ${#FAILED[@]} -gt 0 ]; then
    say "failed: ${FAILED[*]}"
    exit 1
fi
say "all steps passed; tables in $OUT_DIR"
