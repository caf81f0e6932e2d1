"""userspace/programs: model programs the kernel runs (program text, shared read-only).

loader.load is the binfmt handler registered under the "kvos.programs" entry point; fetch.pull
gets a named model into the cache; llama.LlamaProgram is the forward pass over a packed batch on
paged KV memory; sim.SimProgram is a model on the simulated device, described by config.LlamaConfig.
"""
