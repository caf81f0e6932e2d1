"""The systems `kvos bench` compares, one module each, each run as its own process.

Every module is `python -m userspace.bench.systems.NAME WORKLOAD.json OPTIONS.json` (the
protocol is in userspace/bench/child.py) and returns the same result shape: per sample the
times its tokens became available, plus load time, wall time and peak KV memory.
"""

SYSTEMS = {
    "kvos": "userspace.bench.systems.kvos",
    "kvos-bf16": "userspace.bench.systems.kvos_bf16",
    "kvos-bf16kv": "userspace.bench.systems.kvos_bf16kv",
    "kvos-gguf": "userspace.bench.systems.kvos_gguf",
    "kvos-gguf-kv8": "userspace.bench.systems.kvos_gguf_kv8",
    "hf-static": "userspace.bench.systems.hf_static",
    "hf-cb": "userspace.bench.systems.hf_cb",
    "llama.cpp": "userspace.bench.systems.llamacpp",
}
DEFAULT_SYSTEMS = ("kvos", "kvos-bf16", "kvos-bf16kv", "kvos-gguf", "kvos-gguf-kv8", "hf-static", "hf-cb", "llama.cpp")
# the rows ratios are taken of (and a roofline); the others are baselines
KVOS_SYSTEMS = ("kvos", "kvos-bf16", "kvos-bf16kv", "kvos-gguf", "kvos-gguf-kv8")
