#!/bin/bash
# `kvos bench --device cuda` on a lent GPU, in one call under 5 minutes (bash benchmarks/gpu_bench.sh).
#
# gpu_session.sh checks the CUDA code (its parts already fill 470 s); this times the serving stack
# against transformers on the same GPU: kvos (float32, and kvos-bf16: the whole program in bf16)
# with hf-static and hf-cb (float32), the mixed workload's quick quarter, the GPU's GEMM rates and
# device read bandwidth measured in the same run for the ceiling and rooflines (160 s); then the
# kvos rows again with decode graphs (--graphs, 90 s). The machine has no network: like
# gpu_session.sh it installs cffi and gguf from .whl/, and it needs the model file, at
# $KVOS_MODEL_PATH or .models/SmolLM2-135M-Instruct.Q4_1.gguf (98 MB: more than one call carries,
# so it comes in two parts over two calls, joined here: benchmarks/gpu_model_parts.sh says how);
# without it both parts run tiny-llama instead (kvos rows only: the baselines need a GGUF) and say so.
# Output: $OUT (or out/) bench.json, bench-graphs.json and the systems' stderr logs.
# Exit status: the number of parts that failed.
set -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
failed=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/env.txt"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/build.log" 2>&1 \
  || python3 csrc/cpu/build_ffi.py >> "$OUT/build.log" 2>&1 \
  || { echo "C kernels: build failed"; tail -20 "$OUT/build.log"; }

source benchmarks/gpu_model_join.sh
MODEL=(--model smollm2-135m --systems kvos,kvos-bf16,hf-static,hf-cb)
[ -z "$KVOS_MODEL_PATH" ] && [ -f .models/SmolLM2-135M-Instruct.Q4_1.gguf ] \
  && export KVOS_MODEL_PATH="$PWD/.models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -z "$KVOS_MODEL_PATH" ]; then
  echo "no model file (KVOS_MODEL_PATH or .models/): tiny-llama, kvos rows only"
  MODEL=(--model tiny-llama --memory 64MiB --systems kvos,kvos-bf16)
fi

part() {   # part NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo; echo "######## $name"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=$?
  echo "######## $name: exit $rc"
  [ $rc -eq 0 ] || failed=$((failed + 1))
}

part bench 160 python3 -m userspace.bench --device cuda --workload mixed --quick "${MODEL[@]}" --timeout 100 \
  --output "$OUT/bench.json" --log-dir "$OUT/bench-logs"
part bench-graphs 90 python3 -m userspace.bench --device cuda --graphs --workload mixed --quick "${MODEL[@]}" \
  --systems kvos,kvos-bf16 --timeout 60 --output "$OUT/bench-graphs.json" --log-dir "$OUT/bench-graphs-logs"

echo; echo "parts failed: $failed"
exit $failed
