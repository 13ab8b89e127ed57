#!/usr/bin/env bash
# The GPU check in one call, for a lent machine with CUDA and no network (docs/gpu.md). Each part runs
# under its own time limit and writes what it measured to $OUT (default: gpu-results/) as it goes, so a
# part that fails or runs out of time costs only itself:
#  1. installs the wheels carried in wheels/ (none there: what is installed is used), fetched beforehand
#     on a machine with the network, for the GPU machine's Python (here 3.12, x86-64):
#       pip download --no-deps --only-binary :all: --python-version 3.12 --platform manylinux_2_24_x86_64 \
#           --platform manylinux_2_17_x86_64 -d wheels bitsandbytes==0.50.2 tantivy==0.27.0 rank-bm25==0.2.2
#  2. starts `searchr1.py --model tiny` on the CPU in the background: README's first command, which must
#     give README's result on a GPU machine too (tiny.txt);
#  3. checks in seconds that bitsandbytes' 4-bit kernels run on this GPU (the wheel must hold a build for
#     its CUDA), and skips the GPU parts if they do not;
#  4. runs `python bench.py gpu` under a 24 GB cap (every phase), then under a 16 GB cap (the step only),
#     each printed (gpu-24.txt, gpu-16.txt) and written as JSON after every phase (gpu-24.json, gpu-16.json).
# Expected on the H200 (estimated, docs/gpu.md): ~1 min start-up and tiny task in parallel, ~4.5 min at
# 24 GB, ~2.5 min at 16 GB. SEARCHR1_BENCH_CPU=1 runs the same path on the CPU at tiny sizes, without the
# CUDA check and the tiny task (CI does, so the script itself is tested).
set -u
export PYTHONUNBUFFERED=1  # every line reaches its file as it is printed
cd "$(dirname "$0")"
out=${OUT:-gpu-results}
mkdir -p "$out"
python=${PYTHON:-python3}
cpu=${SEARCHR1_BENCH_CPU:-0}
failed=0

part() {  # part NAME SECONDS COMMAND...: runs it under its limit, shows it and keeps it in $out/NAME.txt
  local name=$1 seconds=$2
  shift 2
  echo "== $name (at most $seconds s): $*"
  timeout "$seconds" "$@" > "$out/$name.txt" 2>&1
  local rc=$?
  cat "$out/$name.txt"
  [ $rc = 0 ] || { echo "== $name: exit code $rc$([ $rc = 124 ] && echo ', out of time')"; failed=1; }
}

if compgen -G "wheels/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --target .wheels wheels/*.whl
  export PYTHONPATH="$PWD/.wheels${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$cpu" = 1 ]; then
  part gpu-24 300 "$python" bench.py gpu --tiny --json "$out/gpu-24.json"
  part gpu-16 300 "$python" bench.py gpu --tiny --phases step --json "$out/gpu-16.json"
  exit $failed
fi
work=$(mktemp -d)
OMP_NUM_THREADS=2 timeout 540 "$python" searchr1.py --model tiny --out-dir "$work/tiny" > "$out/tiny.txt" 2>&1 &
tiny=$!
part check 60 "$python" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("bench-gpu.sh: no CUDA device is visible (torch %s)" % torch.__version__)
import bitsandbytes as bnb
layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
y = layer(torch.randn(2, 64, device="cuda", dtype=torch.bfloat16))
torch.cuda.synchronize()
print(f"4-bit kernels run: bitsandbytes {bnb.__version__}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_name()}, output {tuple(y.shape)}")
EOF
if [ $failed = 0 ]; then
  part gpu-24 300 "$python" bench.py gpu --memory-cap-gb 24 --json "$out/gpu-24.json"
  part gpu-16 200 "$python" bench.py gpu --memory-cap-gb 16 --phases step --json "$out/gpu-16.json"
fi
wait $tiny
rc=$?
echo "== tiny (exit code $rc$([ $rc = 124 ] && echo ', out of time')):"
tail -n 6 "$out/tiny.txt"
[ $rc = 0 ] || failed=1
rm -rf "$work"
exit $failed
