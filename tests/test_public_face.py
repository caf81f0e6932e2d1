"""The public face: `import kvos`, `python -m kvos`, `kvos --version`, and the one-door rule.

The rule (docs/design.md): userspace reaches the kernel through syscall handles only. Imports are
checked by import-linter (pyproject.toml); this test checks what imports cannot see: that no
userspace module outside the model programs reads an attribute of a Kernel object other than the
booter's two (syscalls, shutdown), nor a name of the kernel package it does not export.
"""
import ast
import subprocess
import sys
from pathlib import Path

import kernel
import kvos

REPO = Path(__file__).resolve().parent.parent
BOOTER = {"syscalls", "shutdown"}                   # what whoever booted a kernel may call on it
KERNEL_NAMES = {"k", "kern", "the_kernel"}          # what code calls a booted kernel


def test_import_kvos_gives_the_public_api():
    assert kvos.boot is kernel.boot and issubclass(kvos.KvosError, Exception)
    for name in ("ExitStatus", "ReadResult", "ProcInfo", "MemInfo", "PageMap", "SchedStat", "StepRecord",
                 "TenantInfo", "LogEntry", "SystemInfo"):
        assert hasattr(kvos, name), name
    assert callable(kvos.libc.generate) and callable(kvos.Client)
    assert kvos.__version__ and kvos.__version__ != "0+unknown"


def test_python_m_kvos_and_version():
    out = subprocess.run([sys.executable, "-m", "kvos", "--version"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == f"kvos {kvos.__version__}"
    out = subprocess.run([sys.executable, "-m", "kvos", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "demo" in out.stdout and "serve" in out.stdout


def _kernel_reads(path: Path) -> list:
    """(line, expression) of every attribute read off a booted kernel, or off the kernel package,
    that is not public."""
    tree = ast.parse(path.read_text(), str(path))
    module_names = {"kernel"} if any(isinstance(n, ast.Import) and any(a.name == "kernel" for a in n.names)
                                     for n in ast.walk(tree)) else set()
    public = set(kernel.__all__) - {"Kernel"}
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        on_kernel_object = (isinstance(base, ast.Name) and base.id in KERNEL_NAMES) or \
            (isinstance(base, ast.Attribute) and base.attr == "kernel")
        on_module = isinstance(base, ast.Name) and base.id in module_names
        if on_kernel_object and node.attr not in BOOTER:
            bad.append((node.lineno, ast.unparse(node)))
        elif on_module and node.attr not in public | BOOTER:
            bad.append((node.lineno, ast.unparse(node)))
    return bad


def test_userspace_reads_no_kernel_object():
    found = {}
    for path in sorted((REPO / "userspace").rglob("*.py")):
        if "programs" in path.relative_to(REPO / "userspace").parts:
            continue                                   # the program ABI: the other door
        bad = _kernel_reads(path)
        if bad:
            found[str(path.relative_to(REPO))] = bad
    assert not found, found


# Library code logs (the logging module) and returns; only the commands print their output.
LIBRARY = ("kernel", "userspace/daemon", "userspace/libc", "userspace/programs")


def test_library_code_logs_rather_than_prints():
    found = {}
    for folder in LIBRARY:
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            calls = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                     and n.func.id == "print"]
            if calls:
                found[str(path.relative_to(REPO))] = calls
    assert not found, found
