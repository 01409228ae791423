#!/usr/bin/env bash
# The GPU check in one call, for a lent H100 (torch with CUDA, nvcc and
# compute-sanitizer there; nothing installable, no network):
#   1. builds the CPU and CUDA kernels in place (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16),
#      or takes a module built elsewhere for the same torch (--prebuilt);
#   2. runs the CUDA tests (every test with "cuda" or "nccl" in its id, the host-emulated
#      ones excepted): pytest.log, junit.xml;
#   3. runs compute-sanitizer memcheck and racecheck over a few CUDA parity tests: sanitizer.log;
#   4. runs the GPU benchmark (llama-1b shapes scaled to 400M params and many-small, fp32 and
#      bf16, AdamW + clipping; torch for-loop, foreach and fused with clip_grad_norm_,
#      fused_wd.reference, fused_wd): bench/report.md, bench/results.json; then the host
#      cost per tensor of the step at 100 and 10,000 tiny tensors (--preset overhead,
#      AdamW and SGD, against torch fused): bench/overhead.md; then the norm in backward
#      (fused_wd.bench.norm_backward: the 50M set's clipped step and the small GPT's iteration
#      against the unclipped ones), its tables in gpu_verify.log;
#   5. runs the rest of the suite (the CPU tests, on this machine's CPU) in the time left,
#      appending to pytest.log: junit-cpu.xml;
#   6. prints a summary table last. gpu_verify.log holds everything printed.
# Every phase has a hard time limit inside the budget for the whole run (GPU_VERIFY_BUDGET
# seconds, default 470); the last phase runs only with a minute or more left.
#
# Usage: scripts/gpu_verify.sh [--dry-run] [--prebuilt SO] OUTDIR     (OUTDIR: new or empty)
#   --dry-run      everything that needs no GPU, so that a typo cannot waste the GPU's
#                  minutes (CI runs it): a CPU-only build in place, the suite and the
#                  sanitizer tests collected, the benchmark's arguments on a tiny CPU run,
#                  and the output layout (at most 8 files, at most 2 folders down).
#   --prebuilt SO  use SO as fused_wd/_C.abi3.so when it was built from these sources
#                  (SO.sources, written by gpu_prebuild.sh) for this very torch, with
#                  CUDA (without, for --dry-run); the module is abi3, so one
#                  build serves every Python. Otherwise it says why and builds. This saves
#                  the GPU machine the build's minutes.
set -uo pipefail

usage() { sed -n '/^# Usage/,/^[^#]/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; }
dry=0
out=
prebuilt=
while (($#)); do
  case $1 in
    --dry-run) dry=1 ;;
    --prebuilt)
      [ -f "${2:-}" ] || { echo "gpu_verify: --prebuilt needs a file, got '${2:-}'" >&2; exit 2; }
      prebuilt=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
      shift ;;
    -h | --help) usage 2>&1; exit 0 ;;
    -*) echo "gpu_verify: unknown option $1" >&2; usage; exit 2 ;;
    *) [ -z "$out" ] || { echo "gpu_verify: one OUTDIR only" >&2; exit 2; }; out=$1 ;;
  esac
  shift
done
[ -n "$out" ] || { usage; exit 2; }
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
[ -z "$(ls -A "$out")" ] || { echo "gpu_verify: $out is not empty" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 2
exec > >(tee -a "$out/gpu_verify.log") 2>&1
tee_pid=$!

PY=${PYTHON:-python3}
export PYTHONPATH="$root" PYTHONUNBUFFERED=1
start=$(date +%s)
budget=${GPU_VERIFY_BUDGET:-470}
[[ $budget =~ ^[0-9]+$ ]] || { echo "gpu_verify: GPU_VERIFY_BUDGET must be seconds, got '$budget'" >&2; exit 2; }
deadline=$((start + budget))
rows=()
failed=0

# limit CAP RESERVE: seconds for the next phase: at most CAP, leaving RESERVE for the ones after it
limit() {
  local left=$((deadline - $(date +%s) - $2))
  ((left > $1)) && left=$1
  ((left < 20)) && left=20
  echo "$left"
}
# at the limit SIGINT (pytest and the benchmark then write what they have), SIGKILL 20 s later
limited() { timeout -s INT -k 20 "$@"; }
begin() {
  phase=$1
  t0=$(date +%s)
  echo
  echo "=== [$((t0 - start)) s] $phase"
}
finish() {  # finish RC DETAIL
  local dt=$(($(date +%s) - t0)) st
  case $1 in 0) st=ok ;; 124 | 137) st=TIMEOUT ;; *) st="FAILED ($1)" ;; esac
  [ "$1" = 0 ] || failed=1
  rows+=("| $phase | $st | $dt | $2 |")
  echo "=== $phase: $st in $dt s${2:+: $2}"
}
summary() {
  echo
  echo "=== summary ($( ((dry)) && echo "dry run, ")$(($(date +%s) - start)) s in all)"
  echo "| phase | result | s | detail |"
  echo "|---|---|---:|---|"
  printf '%s\n' "${rows[@]}"
  [ -f "$out/bench/results.json" ] && "$PY" - "$out/bench/results.json" <<'EOF'
import json, sys
res = json.load(open(sys.argv[1]))
print("\n| benchmark | fused_wd ms | GB/s | % copy BW | x torch fused | x torch for-loop | launches (fused_wd / torch fused) | check |")
print("|---|---:|---:|---:|---:|---:|---:|---|")
for c in res["cases"]:
    im = c.get("impls", {})
    f, t = im.get("fused_wd", {}), im.get("torch-fused", {})
    if "median_s" not in f:
        print(f"| {c['title']} | {c.get('skipped') or f.get('note') or 'no result'} |||||||")
        continue
    sp = f.get("speedup", {})
    bad = [n for n, r in im.items() if r.get("check") and not r["check"]["ok"]]
    print(f"| {c['title']} | {f['median_s'] * 1e3:.3f} | {f['gbps']:.0f} | {f.get('pct_bw', 0):.0f}% "
          f"| {sp.get('torch-fused', 0):.2f} | {sp.get('torch-forloop', 0):.2f} "
          f"| {f.get('launches') or '-'} / {t.get('launches') or '-'} | {'MISMATCH ' + ', '.join(bad) if bad else 'ok'} |")
EOF
  [ -f "$out/bench/overhead.md" ] && { echo; grep "^|" "$out/bench/overhead.md"; }
}
end() {  # end STATUS: the summary last, then exit
  summary
  exec >&- 2>&-
  wait "$tee_pid"
  exit "$1"
}

begin preflight
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__,
      '| GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
. scripts/toolchain.sh
find_cuda_home
sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
echo "CUDA_HOME=${CUDA_HOME:-none}; compute-sanitizer: $([ -x "$sanitizer" ] && echo "$sanitizer" || echo missing)"
command -v nvidia-smi >/dev/null &&
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv
if ((!dry)) && ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  finish 1 "torch sees no GPU (use --dry-run without one)"
  end 1
fi
finish 0 ""

begin build
if ((dry)); then
  export FUSED_WD_CUDA=0 MAX_JOBS=${MAX_JOBS:-2}
  want=0
else
  export FUSED_WD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
  want=1
fi
# module_ok: the in-place module loads from this tree, for this torch, with(out) CUDA as wanted
module_ok() {
  "$PY" -c "import fused_wd, fused_wd._C as C, torch
assert fused_wd.__file__.startswith('$root/'), fused_wd.__file__
assert C.torch_version == torch.__version__, 'built for torch %s, not %s' % (C.torch_version, torch.__version__)
assert C.with_cuda == $want, 'with_cuda is %d' % C.with_cuda"
}
rc=1
how=
if [ -n "$prebuilt" ]; then
  if [ "$(cat "$prebuilt.sources" 2>/dev/null)" != "$(sources_fingerprint)" ]; then
    echo "gpu_verify: $prebuilt was not built from these sources ($prebuilt.sources: $(cat "$prebuilt.sources" \
      2>/dev/null || echo missing), here: $(sources_fingerprint)); building instead"
  else
    cp "$prebuilt" fused_wd/_C.abi3.so && module_ok && rc=0 && how="prebuilt $prebuilt"
    ((rc)) && echo "gpu_verify: the prebuilt module is not usable here (above); building instead"
  fi
fi
if ((rc)); then
  limited "$(limit 300 170)" "$PY" setup.py -q build_ext --inplace
  rc=$?
  ((rc)) || module_ok || rc=1
  how="FUSED_WD_CUDA=$FUSED_WD_CUDA$( ((dry)) || echo " TORCH_CUDA_ARCH_LIST=9.0") MAX_JOBS=$MAX_JOBS"
fi
finish $rc "$how"
((rc)) && end 1

pytest=("$PY" -m pytest -p no:cacheprovider)
((dry)) && pytest+=(--collect-only)
workers=()  # pytest-xdist, where installed: 4 processes share the GPU
"$PY" -c "import xdist" 2>/dev/null && workers=(-n 4)
cuda_ids="cuda or nccl"
# run_tests SECONDS KEYWORDS JUNIT: the tests matching KEYWORDS, their log appended to pytest.log;
# sets rc and detail
run_tests() {
  echo "=== pytest -k '$2' (at most $1 s)" >>"$out/pytest.log"
  limited "$1" "${pytest[@]}" "${workers[@]}" -q -rfE tests -m "not cuda_emulated" -k "$2" \
    --junitxml="$out/$3" >>"$out/pytest.log" 2>&1
  rc=$?
  ((dry)) || tail -n 12 "$out/pytest.log"
  detail=$("$PY" - "$out/$3" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    s = ET.parse(sys.argv[1]).getroot()
    s = s if s.tag == "testsuite" else s[0]
    n, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
    print(f"{n - f - e - k} pass, {f} fail, {e} error, {k} skipped, of {n}")
except Exception as ex:
    print(f"no junit result ({type(ex).__name__})")
EOF
)
  ((dry)) && detail="collect-only: $(grep -c "::" "$out/pytest.log") test ids so far${workers:+, with pytest-xdist}"
}

begin "CUDA tests"
run_tests "$(limit 200 170)" "$cuda_ids" junit.xml
finish $rc "$detail"

begin sanitizers
san_tests=(
  "tests/test_cuda.py::test_adam_matches_cpu_kernels_bitwise[float32-plain-adamw-clip]"
  "tests/test_cuda.py::test_adam_matches_cpu_kernels_bitwise[bfloat16-master-amsgrad-maximize-scaled-lrtensor-clip]"
  "tests/test_cuda.py::test_sgd_matches_cpu_kernels_bitwise[float16-plain-nesterov-independent-maximize-clip]"
  "tests/test_cuda.py::test_sgd_matches_cpu_kernels_bitwise[float32-bf16-state-momentum-dampening-decoupled-scaled-noclip]"
  "tests/test_cuda.py::test_multi_tensor_norm_values_and_nonfinite"
  "tests/test_cuda.py::test_clip_op[0.5]"
)
if ((dry)); then
  "${pytest[@]}" -q "${san_tests[@]}" >"$out/sanitizer.log" 2>&1
  rc=$?
  n=$(grep -c "::" "$out/sanitizer.log")
  [ "$n" = ${#san_tests[@]} ] || rc=1
  detail="collect-only: $n of ${#san_tests[@]} test ids"
else
  rc=0
  detail=
  for tool in memcheck racecheck; do
    envs=()  # memcheck: no caching allocator, so that every tensor is its own allocation
    [ $tool = memcheck ] && envs=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
    log=$(mktemp)
    reserve=$([ $tool = memcheck ] && echo 90 || echo 60)  # racecheck, benchmark
    limited "$(limit 90 "$reserve")" env "${envs[@]}" \
      "$sanitizer" --tool $tool --error-exitcode 99 "${pytest[@]}" -q "${san_tests[@]}" >"$log" 2>&1
    r=$?
    ((r)) && rc=$r
    { echo "--- compute-sanitizer --tool $tool: exit $r"; cat "$log"; } >>"$out/sanitizer.log"
    detail+="$tool: $(grep -Eo "[0-9]+ (passed|failed).*in [0-9.]+s" "$log" | tail -n1);"
    detail+=" $(grep -Eo "(ERROR|RACECHECK) SUMMARY: .*" "$log" | tail -n1); "
    rm -f "$log"
  done
fi
finish $rc "$detail"

begin benchmark
# on an H100 the 4000-tensor tables alone took 100 s (torch's for-loop and the reference
# step them slowly, and each is profiled once for its launches): up to 270 s here
# (no plot: the host-cost phase's report takes its place among the 8 files)
bench=(--dtype "fp32,bf16" --optim adamw --clip on --impl "fused_wd,torch,reference" --e2e off
  --repeats 5 --warmup 1 --iters 3 --no-progress --no-plot --out "$out/bench")
if ((dry)); then
  "$PY" -m fused_wd.bench --list >/dev/null &&
    limited 300 "$PY" -m fused_wd.bench --device cpu --preset llama-1b:1M,tiny --bw-mib 64 "${bench[@]}"
else
  limited "$(limit 270 70)" "$PY" -m fused_wd.bench --device cuda --preset llama-1b:400M,many-small "${bench[@]}"
fi
finish $? "$(ls "$out/bench" 2>/dev/null | tr '\n' ' ')"

begin "host cost"
# issue 21: the host time per tensor of opt.step() over many tiny tensors, fused_wd next to
# torch's fused step (fused_wd.bench --preset overhead); its report lands in bench/
ov=(--preset overhead --optim adamw,sgd --no-progress --no-plot --out "$out/overhead")
if ((dry)); then
  limited 120 "$PY" -m fused_wd.bench --device cpu --sizes 100 "${ov[@]}"
else
  limited "$(limit 60 0)" "$PY" -m fused_wd.bench --device cuda --sizes 100,10000 "${ov[@]}"
fi
rc=$?
mv "$out/overhead/report.md" "$out/bench/overhead.md" 2>/dev/null || rc=1
rm -rf "$out/overhead"
finish $rc "bench/overhead.md"

begin "norm in backward"
# issue 15: the clipped step and the small GPT's iteration with the norm gathered in backward,
# against the unclipped ones (fused_wd.bench.norm_backward); its tables go to gpu_verify.log
nb=(--dtype "fp32,bf16" --repeats 5 --warmup 1 --trials 1)
if ((dry)); then
  limited 120 "$PY" -m fused_wd.bench.norm_backward --device cpu --preset tiny "${nb[@]}"
else
  limited "$(limit 60 0)" "$PY" -m fused_wd.bench.norm_backward --device cuda --preset cpu-50m "${nb[@]}" \
    --e2e-repeats 5
fi
finish $? "its tables are in gpu_verify.log"

begin "CPU tests"
if (($(limit 9999 0) >= 60)); then
  run_tests "$(limit 9999 0)" "not ($cuda_ids)" junit-cpu.xml
  finish $rc "$detail"
else
  rows+=("| $phase | skipped | 0 | less than a minute of the budget left |")
  echo "=== $phase: skipped, less than a minute of the budget left"
fi

begin "output layout"
nfiles=$(find "$out" -type f | wc -l)
deep=$(find "$out" -mindepth 3 -type d | head -n1)  # a folder 3 down
(cd "$out" && find . -type f | sort | tr '\n' ' ')
echo
[ "$nfiles" -le 8 ] && [ -z "$deep" ]
finish $? "$nfiles files (at most 8)${deep:+, too deep: $deep}"

end $failed
