#!/bin/bash
# Everything kvos checks on a lent GPU, in one call (bash benchmarks/gpu_session.sh).
#
# The GPU machine has torch, CuPy, transformers and pytest but not cffi or gguf, and no
# network: carry them as wheels in .whl/ (see docs/kernels.md). It builds the C kernels
# there (-march=native must match that CPU), then runs, each under its own time limit
# (the limits add up to 470 s, so the whole call fits a 10-minute device command with room):
#   1. benchmarks/gpu_check.py   every CUDA op against its torch twin, refusals, attention timing (100 s)
#   2. benchmarks/gpu_attention.py  decode attention v2 against the twin, then GB/s of v1, v2, SDPA on
#                                a contiguous cache and FlexAttention's paged path, beside a copy (140 s)
#   3. pytest -m cuda            the CUDA tests of the suite (ops, custom ops, programs against HF,
#                                decode graphs against eager, LoRA adapters against the CPU, the
#                                draw on CUDA rows against the C one) (80 s)
#   (benchmarks/gpu_attention_variants.py when .variants/ is carried: kernel variants timed)
#   4. benchmarks/gpu_kernel.py  the whole kernel on the GPU against the CPU, eager and with decode
#                                graphs (32/32 greedy outputs, fsck), then decode step time eager vs
#                                graphs at batch 1, 8, 64, 256, launches and GPU busy, capture cost (150 s)
# Logs land in $OUT (or out/ here). Exit status: the number of parts that failed.
set -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
failed=0

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, cupy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cupy', cupy.__version__)"
  nproc; } 2>&1 | tee "$OUT/env.txt"

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The install step of the Makefile, offline: builds the C kernels and registers the entry points.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/build.log" 2>&1 \
  || python3 csrc/cpu/build_ffi.py >> "$OUT/build.log" 2>&1 \
  || { echo "C kernels: build failed"; tail -20 "$OUT/build.log"; failed=$((failed + 1)); }
python3 -c "from kernel.ops import _kvos_cpu" && echo "C kernels: built"

part() {   # part NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo; echo "######## $name"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=$?
  echo "######## $name: exit $rc"
  [ $rc -eq 0 ] || failed=$((failed + 1))
}

part gpu_check 100 python3 benchmarks/gpu_check.py
part gpu_attention 140 python3 benchmarks/gpu_attention.py --variant stages3=stages:3 --variant warps2=warps:2 --variant chunk512=chunk:512
part pytest_cuda 80 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_ops_cuda.py tests/test_programs_tiny.py \
  tests/test_graphs.py tests/test_ops_library.py tests/test_ops_draw.py
if [ -f .variants/attention_v1.cu ]; then     # tuning runs carry older kernels in .variants/
  part variants 200 python3 benchmarks/gpu_attention_variants.py v1=.variants/attention_v1.cu \
    unroll1=-DUNROLL=1 unroll2=-DUNROLL=2 shipped= unroll8=-DUNROLL=8 minblocks6=-DMIN_BLOCKS=6
fi
part gpu_kernel 150 python3 benchmarks/gpu_kernel.py

echo; echo "parts failed: $failed"
exit $failed
