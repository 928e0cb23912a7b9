#!/usr/bin/env bash
# Build and install horovod 0.28.1 with PyTorch support into the environment of $PYTHON.
#
# Horovod is OPTIONAL for clipvip (DESIGN §6): torch.distributed, launched by `torchrun` or
# `accelerate launch`, is the recommended engine. This script exists for people who want to launch
# with `horovodrun` (docs/horovod.md).
#
# Why a script: PyPI's last horovod release (0.28.1) does not build against torch >= 2.1 as
# published, because its CMake files ask for C++14 and torch's headers need C++17. This script
# downloads the 0.28.1 source distribution, raises `set(CMAKE_CXX_STANDARD 14)` to 17 in the top
# CMakeLists.txt and in horovod/torch/CMakeLists.txt, and builds it against the torch already
# installed in the target environment (--no-build-isolation).
#
# Usage:
#   PYTHON=/path/to/venv/bin/python bash scripts/install_horovod.sh   # default PYTHON=python
#
# Environment:
#   PYTHON                  the interpreter whose environment gets horovod (torch must be there)
#   HOROVOD_GPU_OPERATIONS  GPU users: set HOROVOD_GPU_OPERATIONS=NCCL (needs CUDA torch, the CUDA
#                           toolkit's nvcc and NCCL) so that allreduce/allgather of CUDA tensors go
#                           through NCCL; left unset, the build is CPU-only (Gloo).
#   HOROVOD_BUILD_DIR       where the source is unpacked (default: a temporary folder, removed after)
#
# The build uses these flags (others may be added by the caller):
#   HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITH_GLOO=1
#   HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
# MPI is left out: launch with `horovodrun --gloo` (horovodrun picks Gloo by itself when no MPI is
# found).
#
# Needs: a C++17 compiler (g++ >= 7), cmake >= 3.13, and network access to PyPI.
# About 5 minutes of CPU time to compile (13 min wall on a busy 2-core machine).
# Idempotent: does nothing when `import horovod.torch` already works.
set -euo pipefail

HOROVOD_VERSION=0.28.1
PYTHON="${PYTHON:-python}"

say() { printf '[install_horovod] %s\n' "$*"; }
die() { printf '[install_horovod] error: %s\n' "$*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON is not an interpreter on PATH"
PY_PATH="$(command -v "$PYTHON")"

if "$PYTHON" -c "import horovod.torch" >/dev/null 2>&1; then
    version="$("$PYTHON" -c 'import horovod; print(horovod.__version__)')"
    say "horovod $version with PyTorch support is already installed for $PY_PATH; nothing to do"
    exit 0
fi

"$PYTHON" -c "import torch" >/dev/null 2>&1 \
    || die "torch is not importable by $PY_PATH: install torch first (horovod builds against it)"
command -v cmake >/dev/null 2>&1 || die "cmake is needed (apt-get install cmake, or pip install cmake)"
CXX_BIN="${CXX:-g++}"
command -v "$CXX_BIN" >/dev/null 2>&1 || die "a C++ compiler is needed ($CXX_BIN not found; apt-get install g++)"

TORCH_VERSION="$("$PYTHON" -c 'import torch; print(torch.__version__)')"
say "target: $PY_PATH (torch $TORCH_VERSION); building horovod $HOROVOD_VERSION"
if [[ -n "${HOROVOD_GPU_OPERATIONS:-}" ]]; then
    say "HOROVOD_GPU_OPERATIONS=$HOROVOD_GPU_OPERATIONS: building the GPU operations too"
else
    say "CPU-only build (Gloo); GPU users: rerun with HOROVOD_GPU_OPERATIONS=NCCL"
fi

say "installing the build/runtime helpers horovod needs: cloudpickle cffi"
"$PYTHON" -m pip install cloudpickle cffi

if [[ -n "${HOROVOD_BUILD_DIR:-}" ]]; then
    WORK="$HOROVOD_BUILD_DIR"
    mkdir -p "$WORK"
else
    WORK="$(mktemp -d -t horovod-build.XXXXXX)"
    trap 'rm -rf "$WORK"' EXIT
fi

say "downloading the source distribution into $WORK"
"$PYTHON" -m pip download --no-binary :all: --no-deps --dest "$WORK" "horovod==$HOROVOD_VERSION"
SDIST="$WORK/horovod-$HOROVOD_VERSION.tar.gz"
[[ -f "$SDIST" ]] || die "expected $SDIST after pip download; found: $(ls "$WORK")"
SRC="$WORK/horovod-$HOROVOD_VERSION"
rm -rf "$SRC"
tar -xzf "$SDIST" -C "$WORK"
[[ -d "$SRC" ]] || die "unpacking $SDIST did not give $SRC"

say "patching C++14 -> C++17 (torch >= 2.1 headers need C++17)"
for cmakelists in "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"; do
    [[ -f "$cmakelists" ]] || die "$cmakelists is missing from the source distribution"
    if grep -q 'set(CMAKE_CXX_STANDARD 14)' "$cmakelists"; then
        sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$cmakelists"
    fi
    grep -q 'set(CMAKE_CXX_STANDARD 17)' "$cmakelists" \
        || die "could not set CMAKE_CXX_STANDARD 17 in $cmakelists"
    say "  ${cmakelists#"$WORK"/}: CMAKE_CXX_STANDARD 17"
done

export HOROVOD_WITH_PYTORCH=1
export HOROVOD_WITHOUT_MPI=1
export HOROVOD_WITH_GLOO=1
export HOROVOD_WITHOUT_TENSORFLOW=1
export HOROVOD_WITHOUT_MXNET=1

say "compiling and installing (several minutes; the compiler output follows)"
start=$(date +%s)
"$PYTHON" -m pip install --no-build-isolation -v "$SRC"
say "build took $(( $(date +%s) - start )) s"

if ! "$PYTHON" -c "import horovod.torch" ; then
    die "horovod installed but 'import horovod.torch' fails (see the error above)"
fi
"$PYTHON" - <<'EOF'
import horovod, horovod.torch as hvd
print(f"[install_horovod] horovod {horovod.__version__}: torch ops built={hvd.mpi_built() or hvd.gloo_built()}, "
      f"gloo={hvd.gloo_built()}, mpi={hvd.mpi_built()}, nccl={hvd.nccl_built()}")
EOF
command -v horovodrun >/dev/null 2>&1 || say "note: horovodrun is in $(dirname "$PY_PATH"); put it on PATH"
say "done: launch with  horovodrun -np N -H host:slots --gloo $PYTHON -m clipvip pretrain --config ..."
