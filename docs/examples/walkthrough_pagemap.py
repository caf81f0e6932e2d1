"""Print the pagemaps shown in docs/memory.md: a process after a turn, its fork after a
copy-on-write fault, and a page-cache hit by a later process with the same prompt.
Run: .venv/bin/python docs/examples/walkthrough_pagemap.py"""
import kernel
from userspace.shell.format import meminfo_table, pagemap_table, render


def run_turn(k, pid):
    while k.procs[pid].state.value != "sleeping":
        k.step()


k = kernel.boot(memory="16MiB", swap="4MiB")
sys = k.syscalls()
tid = sys.spawn_tenant("smollm2-135m")
decode = k.tenants[tid].program.decode
prompt = [{"role": "user", "content": "In one sentence, what does a page table do?"}]
pid = sys.spawn(tid, prompt, max_tokens=12, temperature=0, interactive=True)
run_turn(k, pid)
print(render(pagemap_table(sys.pagemap(pid), decode, f"pid {pid} after its first turn")))
[child] = sys.fork(pid)
print(render(pagemap_table(sys.pagemap(child), decode, f"pid {child}, just forked from pid {pid}")))
sys.write(child, [{"role": "user", "content": "Shorter, please."}])
run_turn(k, child)
print(render(pagemap_table(sys.pagemap(pid), decode, f"pid {pid} (parent) after the child's turn")))
print(render(pagemap_table(sys.pagemap(child), decode, f"pid {child} (child) after its copy-on-write fault")))
sys.wait(pid)
sys.wait(child)
again = sys.spawn(tid, prompt, max_tokens=1, temperature=0, interactive=True)
run_turn(k, again)
print(render(pagemap_table(sys.pagemap(again), decode, f"pid {again}: the same prompt again")))
print(render(meminfo_table(sys.meminfo())))
