"""kvos on the GGUF's own quantized weights with an int8 KV cache (KVOS_WEIGHTS=gguf, KVOS_KV=int8).

Each key and value row is stored as int8 codes and a float32 scale (0.27x float32's bytes a token:
a quarter of the frames, of the pool's resident memory and of the bytes decode attention reads);
the C attention widens the rows back to float32 as it reads them (K in registers, V a tile at a
time) before its float32 arithmetic. Outputs are those
of the quantized weights and the rounded K/V, so this row is reported beside `kvos-gguf`."""
import os

os.environ["KVOS_WEIGHTS"] = "gguf"
os.environ["KVOS_KV"] = "int8"

from userspace.bench.child import run_child  # noqa: E402
from userspace.bench.systems.kvos import run  # noqa: E402

if __name__ == "__main__":
    run_child(run)
