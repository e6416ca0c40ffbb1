#!/usr/bin/env bash
# GPU checks for a lent accelerator machine (no network there): the kernel and optimizer tests
# with compiled Triton kernels (no interpreter), the kernel micro-benchmarks, the optimizer-step
# benchmark against galore-torch, and a short training run. Writes logs and a summary table
# into $OUT (or bench_results/gpu). Installs nothing from the network: optional wheels
# (galore-torch, bitsandbytes) are taken from ./.whl when present.
set -uo pipefail
out="${OUT:-bench_results/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

# The repository root is the package `lowmem`: expose it under that name without installing.
pkg=$(mktemp -d)
ln -s "$PWD" "$pkg/lowmem"
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

run() {  # run NAME SECONDS CMD...: log to $out/NAME.txt, stop it after SECONDS, record its status
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.txt"
  echo "| $name | rc=$rc | $((SECONDS - t0)) s |" >>"$out/summary.md"
}

echo "| check | status | time |" >"$out/summary.md"
echo "|---|---|---|" >>"$out/summary.md"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
run env 30 python3 -m lowmem.env
run tests 100 python3 -m pytest -q -x -p no:cacheprovider tests/kernels tests/test_ops.py tests/optim
run step_fp32 40 python3 -m lowmem.bench step --device cuda --json "$out/step_fp32.json"
run micro 40 python3 -m lowmem.bench micro --json "$out/micro.json"
run train 40 python3 -m lowmem.bench train --device cuda --seeds 1 --steps 200 --plot "" --json "$out/train.json"
run step_bf16_4096 40 python3 -m lowmem.bench step --device cuda --dtype bfloat16 --size 4096 --rank 512 \
  --weights 2 --repeats 10 --refresh-repeats 2 --json "$out/step_bf16_4096.json"
cat "$out/summary.md"
