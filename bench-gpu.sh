#!/usr/bin/env bash
# The GPU check in one call, for a machine with CUDA and no network (README: "The 3-hour budget").
#  1. installs the wheels carried in wheels/ (none there: what is installed is used), fetched beforehand
#     on a machine with the network, for the GPU machine's Python (here 3.12, x86-64):
#       pip download --no-deps --only-binary :all: --python-version 3.12 --platform manylinux_2_24_x86_64 \
#           --platform manylinux_2_17_x86_64 -d wheels bitsandbytes==0.50.2 tantivy==0.27.0 rank-bm25==0.2.2
#  2. checks in seconds that bitsandbytes' 4-bit kernels run on this GPU (the wheel must hold a build for
#     its CUDA), and stops there if they do not;
#  3. runs `python bench.py gpu` under a 24 GB and then a 16 GB cap, each table printed and written as
#     JSON to $OUT (default: gpu-results/).
set -euo pipefail
cd "$(dirname "$0")"
out=${OUT:-gpu-results}
mkdir -p "$out"
python=${PYTHON:-python3}
if compgen -G "wheels/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --target .wheels wheels/*.whl
  export PYTHONPATH="$PWD/.wheels${PYTHONPATH:+:$PYTHONPATH}"
fi
"$python" - <<'EOF'
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
for cap in 24 16; do
  "$python" bench.py gpu --memory-cap-gb "$cap" --json "$out/gpu-$cap.json" 2>&1 | tee "$out/gpu-$cap.txt"
done
