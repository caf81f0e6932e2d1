#!/bin/bash
# The default model's file for a lent GPU, cut in two (bash benchmarks/gpu_model_parts.sh), here.
#
# A device call carries at most 64 MiB; SmolLM2-135M-Instruct's GGUF is 98 MB, and the GPU machine
# has no network to pull it. Ignored files a call carried stay on the warm machine for the next
# call (each call replaces only the paths it names), so the file travels in two calls:
#   1. run(command="true", carry=[".models/SmolLM2-135M-Instruct.Q4_1.gguf.part-aa", ".whl"])
#   2. run(command="bash benchmarks/gpu_bench.sh", carry=[".models/SmolLM2-135M-Instruct.Q4_1.gguf.part-ab", ".whl"])
# the second within the machine's idle time (30 s), or the first part goes back with the machine.
# gpu_bench.sh joins the parts (benchmarks/gpu_model_join.sh) and checks the sha256 kvos pins for
# the file before it uses it. Prints the two carry lists.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(.venv/bin/python -c "from userspace.programs.fetch import pull; print(pull(progress=False))")
name=$(basename "$src")
mkdir -p .models
rm -f ".models/$name.part-"*
split -b 48m "$src" ".models/$name.part-"
ls -l ".models/$name.part-"* | awk '{print $5, $9}'
for part in ".models/$name.part-"*; do
  echo "carry: [\"$part\", \".whl\"]"
done
