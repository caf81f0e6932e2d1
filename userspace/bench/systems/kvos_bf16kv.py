"""kvos with a bfloat16 KV cache (KVOS_KV=bfloat16): the same kernel and requests.

The linear layers, activations and attention arithmetic stay float32; write_kv rounds each key
and value to bf16 and the C attention widens them as it reads, so attention reads half the bytes
and a frame holds twice the tokens. Outputs are no longer bit-for-bit those of a float32
reference, so this row is reported beside `kvos`, not instead of it."""
import os

os.environ["KVOS_KV"] = "bfloat16"

from userspace.bench.child import run_child  # noqa: E402
from userspace.bench.systems.kvos import run  # noqa: E402

if __name__ == "__main__":
    run_child(run)
