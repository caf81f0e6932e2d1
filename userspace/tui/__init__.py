"""kvos top: live views of processes, memory, page tables, the scheduler and dmesg (Textual).

app.KvosTop draws a source.Source: a root syscall handle, in-process or a kvosd client;
views holds the renderings, free of Textual, so they can be tested and reused.
"""
