"""kvos top: live views of processes, memory, page tables, the scheduler and dmesg (Textual).

app.KvosTop draws a source (source.LocalSource: an in-process kernel and its loop);
views holds the renderings, free of Textual, so they can be tested and reused.
"""
