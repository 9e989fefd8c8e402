#!/usr/bin/env bash
# Install NVIDIA Transformer Engine for PyTorch on a GPU node, for the `te` spec and the TE FP8 recipes.
#
# TE comes in three parts: the core library, a prebuilt wheel per CUDA major (`transformer-engine-cu12`, ~730 MB, or
# `transformer-engine-cu13`, ~280 MB), chosen here from the CUDA version torch was built with; the metapackage
# `transformer-engine`; and the PyTorch extension `transformer-engine-torch`, an sdist compiled on this node against
# the installed torch (a C++ compiler and the CUDA headers are needed: a CUDA toolkit via CUDA_HOME / nvcc on PATH,
# else the headers of the pip `nvidia-*` wheels torch depends on).
#
#   tools/install_te.sh                          # from the package index, into the current environment
#   tools/install_te.sh --wheels DIR             # offline: DIR holds the files listed below
#   tools/install_te.sh --target DIR ...         # install into DIR instead (then PYTHONPATH=DIR)
#   tools/install_te.sh --check                  # only check the prerequisites and print the plan
#
# The offline set, fetched on a machine with the index (add --python-version/--platform when its Python differs):
#   pip download --no-deps -d DIR transformer-engine==2.20.2 transformer-engine-cu13==2.20.2 \
#     transformer-engine-torch==2.20.2 nvidia-cudnn-frontend nvdlfw-inspect pydantic pydantic-core \
#     annotated-types typing-inspection
#
# Environment: PYTHON (default python3), TE_VERSION (default 2.20.2), MAX_JOBS (default: the CPU count).
# Exit codes: 0 installed (or --check passed), 2 a prerequisite is missing (the message says which and the fix),
# 1 the install or the final import failed.
set -euo pipefail

PY=${PYTHON:-python3}
VERSION=${TE_VERSION:-2.20.2}
WHEELS=""
TARGET=""
CHECK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=${2:?--wheels needs a directory}; shift 2 ;;
    --target) TARGET=${2:?--target needs a directory}; shift 2 ;;
    --version) VERSION=${2:?--version needs a version}; shift 2 ;;
    --check) CHECK=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install_te: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

fail() { echo "install_te: $*" >&2; exit 2; }

command -v "$PY" >/dev/null 2>&1 || fail "no Python at PYTHON=$PY; set PYTHON to the interpreter that holds torch"
CUDA=$("$PY" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null) \
  || fail "$PY cannot import torch: install your CUDA build of torch first"
[ -n "$CUDA" ] || fail "torch $("$PY" -c 'import torch; print(torch.__version__)') has no CUDA (a CPU build): TE needs a CUDA build of torch"
MAJOR=${CUDA%%.*}
case "$MAJOR" in
  12|13) CORE="transformer-engine-cu$MAJOR" ;;
  *) fail "torch is built with CUDA $CUDA; TE $VERSION ships core wheels for CUDA 12 and 13 only" ;;
esac
CXX_BIN=${CXX:-c++}
command -v "$CXX_BIN" >/dev/null 2>&1 || fail "no C++ compiler ($CXX_BIN): install g++ (the PyTorch extension is compiled here)"
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || fail "--wheels $WHEELS is not a directory"
  ls "$WHEELS"/transformer_engine_torch-"$VERSION".tar.gz >/dev/null 2>&1 \
    || fail "--wheels $WHEELS has no transformer_engine_torch-$VERSION.tar.gz (see the offline set in --help)"
  ls "$WHEELS"/transformer_engine_cu"$MAJOR"-"$VERSION"-*.whl >/dev/null 2>&1 \
    || fail "--wheels $WHEELS has no transformer_engine_cu$MAJOR-$VERSION wheel (see the offline set in --help)"
fi
# CUDA headers: a toolkit if there is one, else the nvidia-* wheels
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
fi
if [ -n "${CUDA_HOME:-}" ] && [ -d "$CUDA_HOME/include" ]; then
  export CUDA_HOME
  HEADERS="CUDA toolkit $CUDA_HOME"
  # cuDNN, NCCL, ... headers of torch's nvidia-* wheels (a toolkit does not carry cudnn.h)
  WHEEL_INCLUDES=$("$PY" -c 'import nvidia, pathlib; print(":".join(str(p) for r in nvidia.__path__ for p in sorted(pathlib.Path(r).glob("*/include"))))' 2>/dev/null || true)
  if [ -n "$WHEEL_INCLUDES" ]; then
    export CPATH="$WHEEL_INCLUDES${CPATH:+:$CPATH}"
    HEADERS="$HEADERS + the nvidia-* wheels' include folders"
  fi
else
  "$PY" -c 'import nvidia' 2>/dev/null \
    || fail "no CUDA headers: set CUDA_HOME to a CUDA $MAJOR toolkit, or install torch's nvidia-* wheels"
  export NVTE_BUILD_USE_NVIDIA_WHEELS=1
  HEADERS="the nvidia-* wheels"
fi
JOBS=${MAX_JOBS:-$(nproc)}

echo "install_te: TE $VERSION for torch with CUDA $CUDA: $CORE + transformer-engine + transformer-engine-torch" \
     "(compiled with $CXX_BIN, headers from $HEADERS, $JOBS jobs)${TARGET:+ into $TARGET}${WHEELS:+, files from $WHEELS}"
[ "$CHECK" -eq 1 ] && exit 0

PIP=("$PY" -m pip install --no-cache-dir --disable-pip-version-check)
[ -n "$WHEELS" ] && PIP+=(--no-index --find-links "$WHEELS")
[ -n "$TARGET" ] && { mkdir -p "$TARGET"; PIP+=(--target "$TARGET" --upgrade); export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"; }

# the Python dependencies of the extension that are not already importable
DEPS=()
"$PY" -c 'import cudnn' 2>/dev/null || DEPS+=("nvidia-cudnn-frontend>=1.29.0")
"$PY" -c 'import nvdlfw_inspect' 2>/dev/null || DEPS+=(nvdlfw-inspect)
"$PY" -c 'import pydantic' 2>/dev/null || DEPS+=(pydantic pydantic-core annotated-types typing-inspection)
for mod in einops onnx onnxscript packaging; do
  "$PY" -c "import $mod" 2>/dev/null || echo "install_te: note: $mod is not importable (TE imports it for some features)" >&2
done
# one pip call: with --target, separate calls would replace each other's `transformer_engine/` folder (the core
# wheel and the metapackage both fill it); the extension is compiled here (FORCE_BUILD: no attempt to download a
# prebuilt wheel from GitHub)
NVTE_FRAMEWORK=pytorch NVTE_PYTORCH_FORCE_BUILD=TRUE MAX_JOBS=$JOBS \
  "${PIP[@]}" --no-deps --no-build-isolation "${DEPS[@]}" "$CORE==$VERSION" "transformer-engine==$VERSION" \
  "transformer-engine-torch==$VERSION"

"$PY" - <<'EOF' || { echo "install_te: installed, but the import or the check failed (above)" >&2; exit 1; }
import torch
import transformer_engine
import transformer_engine.pytorch as te

print(f"install_te: transformer_engine {transformer_engine.__version__} imports")
if torch.cuda.is_available():
    layer = te.Linear(64, 64, params_dtype=torch.bfloat16).cuda()
    x = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()
    print(f"install_te: te.Linear forward/backward ran on {torch.cuda.get_device_name()}; FP8: "
          f"{te.is_fp8_available()}, FP8 block scaling: {te.is_fp8_block_scaling_available()}, "
          f"MXFP8: {te.is_mxfp8_available()}")
EOF
