"""kvos on the GGUF's own quantized weights (KVOS_WEIGHTS=gguf): the same kernel and requests.

The linear layers keep the file's blocks (Q4_0, Q4_1, Q8_0...) instead of fp32 copies, so a decode
step reads about a fifth of the bytes; outputs are those of the quantized weights (as llama.cpp's),
not bit-for-bit the float32 reference's, so this row is reported beside `kvos`, not instead of it."""
import os

os.environ["KVOS_WEIGHTS"] = "gguf"

from userspace.bench.child import run_child  # noqa: E402
from userspace.bench.systems.kvos import run  # noqa: E402

if __name__ == "__main__":
    run_child(run)
