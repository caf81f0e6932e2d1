"""The kvos command: main.py parses, commands.py and demo.py run; the TUI lives in userspace/tui.

Everything here is a program on the syscall table (kernel.syscalls()); the few
in-process reads of kernel objects are marked where they happen.
"""
