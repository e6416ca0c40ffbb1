#!/usr/bin/env bash
# GPU checks for a lent accelerator machine (no network there): the kernel, layer and offload
# tests with compiled Triton kernels (no interpreter), the kernel micro-benchmarks, the layer,
# low-precision and offload benchmarks, the optimizer-step benchmarks
# against the research code (galore-torch, fira, apollo-torch, bitsandbytes), a host-overhead
# probe at small sizes, and a short training run. Writes logs and a summary table into $OUT (or
# bench_results/gpu). Installs nothing from the network: optional wheels (galore-torch, fira,
# apollo-torch, bitsandbytes, ninja for the C++ build) are taken from ./.whl when present.
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
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" PATH="/tmp/site/bin:$PATH"
fi

# GPU_CHECK_BUDGET (seconds, default 450): the whole script's wall-clock budget. Checks run in
# order of what they decide (kernel correctness, then the issues' GPU targets, then the
# comparisons); a check whose limit no longer fits in what is left is skipped and listed as such,
# so one call of the device tool never runs past its limit and always writes the summary.
budget=${GPU_CHECK_BUDGET:-450}
start=$SECONDS

run() {  # run NAME SECONDS CMD...: log to $out/NAME.txt, stop it after SECONDS, record its status
  local name=$1 limit=$2; shift 2
  # GPU_CHECK_ONLY="step_fp32 train": run just those checks (a rerun on a short device budget).
  if [[ -n "${GPU_CHECK_ONLY:-}" && " $GPU_CHECK_ONLY " != *" $name "* ]]; then return; fi
  local left=$((budget - (SECONDS - start)))
  if ((left < limit)); then
    echo "| $name | skipped: needs ${limit} s, ${left} s of GPU_CHECK_BUDGET left | 0 s |" >>"$out/summary.md"
    return
  fi
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  tail -n 22 "$out/$name.txt"
  echo "| $name | rc=$rc | $((SECONDS - t0)) s |" >>"$out/summary.md"
}

echo "| check | status | time |" >"$out/summary.md"
echo "|---|---|---|" >>"$out/summary.md"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
run env 40 python3 -m lowmem.env
run tests 180 python3 -m pytest -q -p no:cacheprovider tests/kernels tests/test_ops.py \
  tests/optim/test_state_dtype.py tests/optim/test_apollo_adamw.py tests/optim/test_fira_adamw.py \
  tests/nn tests/memory/test_offload.py tests/memory/test_cpu_offload.py
# Issue targets first. Layers: SLTrain's fused build-W kernel vs torch ops at 4096x4096
# (2048 / 8192 tokens, bf16); int8 / fp8 linears vs bf16 nn.Linear at 4096x4096, 8192 tokens
# (TOPS vs peak); offload: max_memory_allocated and step time at a long sequence.
run lowp 90 python3 -m lowmem.bench lowp --device cuda --json "$out/lowp.json"
run layers 60 python3 -m lowmem.bench layers --device cuda --json "$out/layers.json"
run offload 60 python3 -m lowmem.bench offload --device cuda --json "$out/offload.json"
# Comparisons with the research code and the host-overhead probe.
run step_fp32 60 python3 -m lowmem.bench step --device cuda --repeats 20 --refresh-repeats 3 \
  --optimizers lowmem-randomized,galore-torch,fira,fira-package,apollo,apollo-torch,apollo-mini,adamw \
  --json "$out/step_fp32.json"
# Host overhead: at 64x64 the GPU work is negligible and the step time is Python + launches.
run step_host 40 python3 -m lowmem.bench step --device cuda --size 64 --rank 8 --weights 32 \
  --repeats 20 --refresh-repeats 1 --optimizers lowmem-randomized,galore-torch,fira,fira-package,apollo,apollo-torch \
  --json "$out/step_host.json"
run step8bit 60 python3 -m lowmem.bench step8bit --device cuda --repeats 10 \
  --optimizers lowmem,torch-fused,torch-foreach,bnb --json "$out/step8bit.json"
run micro 50 python3 -m lowmem.bench micro --json "$out/micro.json"
run train 60 python3 -m lowmem.bench train --device cuda --seeds 1 --steps 100 --plot "" \
  --optimizers adamw,galore,galore-torch,fira,fira-package,apollo,apollo-torch,apollo-mini,adamw8bit,galore8bit,bnb-adamw8bit \
  --json "$out/train.json"
cat "$out/summary.md"
