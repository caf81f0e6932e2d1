"""kvos with its linear layers in bfloat16 (KVOS_MATMUL=bfloat16): the same kernel and requests.

Activations, norms, RoPE, attention and the KV cache stay float32; the GEMMs take bf16 weights
(AMX where the CPU has it). Outputs are no longer bit-for-bit those of a float32 reference, so
this row is reported beside `kvos`, not instead of it."""
import os

os.environ["KVOS_MATMUL"] = "bfloat16"

from userspace.bench.child import run_child  # noqa: E402
from userspace.bench.systems.kvos import run  # noqa: E402

if __name__ == "__main__":
    run_child(run)
