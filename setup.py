"""kvos: an operating system for LLM inference.

Installing builds the CPU kernels in csrc/cpu through cffi (cffi_modules).
torch is a plain requirement: GPU users bring their CUDA build; the Makefile
installs the CPU build first on machines without one.
"""
from setuptools import find_packages, setup

setup(
    name="kvos",
    version="0.1.0",
    description="An operating system for LLM inference: paged KV memory, processes, a preemptive scheduler",
    python_requires=">=3.10",
    packages=find_packages(include=["kvos", "kernel", "kernel.*", "userspace", "userspace.*"]),
    # CUDA sources are compiled at run time (CuPy); editable installs read them from csrc/,
    # other installs find them through KVOS_CSRC (kernel/ops/cuda.py).
    package_data={"kernel.ops": ["../../csrc/cuda/*.cu", "../../csrc/cuda/*.cuh", "../../csrc/common/*.h"]},
    include_package_data=True,
    setup_requires=["cffi>=1.15"],
    cffi_modules=["csrc/cpu/build_ffi.py:ffibuilder"],
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "cffi>=1.15",
        "gguf>=0.10",
        "tokenizers>=0.19",
        "transformers>=4.45",
        "safetensors>=0.8",             # the program caches; its pread backend fills the huge-page arena
        "huggingface_hub>=0.34",        # models by hub id (userspace/programs/hub.py); transformers needs it too
        "jinja2>=3.1",
        "rich>=13",
        "matplotlib>=3.7",
        "textual>=0.80",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "prometheus-client>=0.20",
        "llguidance>=1.0",           # structured output (json_schema): the grammar engine, no dependencies
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "pytest-timeout>=2.3", "ruff>=0.6", "accelerate>=1.0",
                 "openai>=1.40", "schemathesis>=4.32", "import-linter>=2.1", "ray[serve]>=2.40",
                 "peft>=0.13"],     # LoRA adapters are checked against PEFT's (tests/test_lora.py)
        # `kvos serve --replicas N`: kernels as Ray actors behind one gateway (userspace/cluster)
        "cluster": ["ray[serve]>=2.40"],
        "cuda": ["cupy-cuda12x"],
        # `kvos bench`'s llama.cpp baseline (a source build: minutes); the bench skips it when absent.
        "bench": ["llama-cpp-python>=0.3"],
    },
    entry_points={
        "console_scripts": ["kvos=userspace.shell.main:main"],
        "kvos.programs": ["llama = userspace.programs.loader:load"],
    },
)
