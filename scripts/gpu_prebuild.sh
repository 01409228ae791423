#!/usr/bin/env bash
# Builds fused_wd._C with the CUDA kernels here, for the GPU machine, so that the GPU's
# minutes are not spent compiling: against the GPU machine's torch (default: the floor
# in pyproject.toml, PyPI's CUDA 13 wheel, in the venv .ci/run keeps), for sm_90, with
# its debug info stripped. The module is abi3: one build serves every Python that torch
# supports. Then, on the GPU machine: scripts/gpu_verify.sh --prebuilt SO OUTDIR
# (it checks that SO was built from this tree's sources, SO.sources, and for the torch it
# finds, and builds there if not).
#
# Usage: scripts/gpu_prebuild.sh SO [TORCH_VERSION]     e.g. .gpu/_C.abi3.so 2.11
#   SO lands outside the package (say in .gpu/, which .gitignore ignores), so that
#   it does not shadow this machine's own build.
set -euo pipefail
[ $# -ge 1 ] && [ $# -le 2 ] || { sed -n '/^# Usage/,/^[^#]/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
so=$1
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
. scripts/toolchain.sh
version=${2:-$(torch_floor)}
find_cuda_home
[ -n "${CUDA_HOME:-}" ] || { echo "gpu_prebuild: no nvcc found; set CUDA_HOME" >&2; exit 1; }
venv="${XDG_CACHE_HOME:-$HOME/.cache}/fused_wd-ci/venv-torch$version"
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(not (torch.__version__.startswith('$version.') and torch.version.cuda))" 2>/dev/null; then
  rm -rf "$venv" && python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$version.*" ninja pytest hypothesis numpy "setuptools>=64" wheel
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$tmp"
start=$(date +%s)
(cd "$tmp" && FUSED_WD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2} \
  "$venv/bin/python" setup.py -q build_ext --inplace) >"$tmp/build.log" 2>&1 || { tail -n 40 "$tmp/build.log"; exit 1; }
(cd "$tmp" && "$venv/bin/python" -c "import fused_wd._C as C, torch
assert C.with_cuda == 1 and C.torch_version == torch.__version__, (C.with_cuda, C.torch_version)
print('built for torch', C.torch_version, 'with CUDA', torch.version.cuda)")
mkdir -p "$(dirname "$so")"
strip --strip-debug -o "$so" "$tmp/fused_wd/_C.abi3.so"
sources_fingerprint >"$so.sources"  # gpu_verify uses SO only for the same sources
echo "gpu_prebuild: $so ($(du -h "$so" | cut -f1)) in $(($(date +%s) - start)) s; on the GPU machine (carry its folder):"
echo "  scripts/gpu_verify.sh --prebuilt $so OUTDIR"
