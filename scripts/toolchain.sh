# Sourced by .ci/run and scripts/gpu_*.sh: where the CUDA toolkit is, and
# which torch the project supports at the least.

# Sets CUDA_HOME, unless it is set, to the toolkit that nvcc runs from (nvcc
# may be a wrapper script that execs the real one).
find_cuda_home() {
  [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null || return 0
  local real
  real=$(sed -n 's/^exec \([^ ]*nvcc\).*/\1/p' "$(command -v nvcc)" | head -n1)
  real=${real:-$(readlink -f "$(command -v nvcc)")}
  CUDA_HOME=$(dirname "$(dirname "$real")")
  export CUDA_HOME
}

# Prints the torch floor of pyproject.toml's dependencies (torch>=X.Y).
torch_floor() {
  python3 -c "import re, tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print(next(re.fullmatch(r'torch>=([0-9.]+)', x).group(1) for x in d if x.startswith('torch')))"
}

# Prints a fingerprint of what the compiled module is built from (every file under csrc/,
# setup.py, pyproject.toml: their paths and contents), so that a module built elsewhere can
# be matched with this tree. Needs no git: the GPU machine gets a copy of the tree.
sources_fingerprint() {
  find csrc setup.py pyproject.toml -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-32
}
