"""The kvos command: main.py parses, commands.py and demo.py run; the TUI lives in userspace/tui.

Everything here is a program on the syscall table: it boots a kernel (kernel.boot)
and uses its handles (kernel.syscalls()), or a running kvosd's client.
"""
