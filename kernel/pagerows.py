"""The batch builder's persistent host page table: one row per address space that has run.

host_batch() asks rows_for(asids, frame lists) each step; a row is rewritten only where its space
changed (pages appended: the new tail; a copy-on-write remap, a swap or attach: the whole row),
then the step's rows are gathered in one numpy index. The memory manager reports every change but
appends in `mm.remapped` (enabled by this table); a frames list that is another object than last
time, or shorter, also rewrites the row. Rows of freed spaces are reclaimed when the table runs out.
"""
import numpy as np

from kernel.errors import KernelPanic


class PageRows:
    def __init__(self, mm, rows: int = 64, width: int = 16):
        self.mm = mm
        mm.remapped = set()                  # asids whose frames changed other than by appends (mm)
        self.table = np.zeros((rows, width), dtype=np.int32)
        self.row_of: dict = {}               # asid -> row index
        self.source: dict = {}               # asid -> (the frames list copied, how many entries)
        self.free = list(range(rows - 1, -1, -1))
        self.tails = self.rewrites = 0       # rows extended by their new pages / rewritten whole (tests)

    def rows_for(self, asids, frame_lists) -> np.ndarray:
        """The page table of a batch: row i holds frame_lists[i] (the frames of asids[i]), padded with 0."""
        for asid in self.mm.remapped:
            self.source.pop(asid, None)      # rewritten whole below if it runs this step
        self.mm.remapped.clear()
        need = max((len(f) for f in frame_lists), default=1) or 1
        if need > self.table.shape[1]:
            self._widen(need)
        index = np.empty(len(asids), dtype=np.intp)
        table, row_of, source = self.table, self.row_of, self.source
        for i, (asid, frames) in enumerate(zip(asids, frame_lists)):
            row = row_of.get(asid)
            if row is None:
                row = self._new_row(asid)
                table = self.table               # _new_row may have grown it
            index[i] = row
            src = source.get(asid)
            n = len(frames)
            if src is not None and src[0] is frames and src[1] <= n:
                if n > src[1]:               # pages appended since the last copy: write the tail
                    table[row, src[1]:n] = frames[src[1]:]
                    source[asid] = (frames, n)
                    self.tails += 1
            else:                            # new, remapped, swapped back in, re-attached or shrunk
                table[row] = 0
                table[row, :n] = frames
                source[asid] = (frames, n)
                self.rewrites += 1
        return table[index, :need]

    def _new_row(self, asid: int) -> int:
        if not self.free:
            self._reclaim()
        if not self.free:
            self._grow()
        row = self.free.pop()
        self.row_of[asid] = row
        self.source.pop(asid, None)
        return row

    def _reclaim(self) -> None:
        """Free the rows of spaces the memory manager no longer has (exited, or made a segment)."""
        spaces = self.mm.spaces
        for asid in [a for a in self.row_of if a not in spaces]:
            self.free.append(self.row_of.pop(asid))
            self.source.pop(asid, None)

    def _grow(self) -> None:
        rows = self.table.shape[0]
        self.table = np.concatenate([self.table, np.zeros_like(self.table)])
        self.free.extend(range(2 * rows - 1, rows - 1, -1))

    def _widen(self, need: int) -> None:
        width = max(need, 2 * self.table.shape[1])
        wider = np.zeros((self.table.shape[0], width), dtype=np.int32)
        wider[:, :self.table.shape[1]] = self.table
        self.table = wider

    def check(self, asids, frame_lists) -> None:
        """KernelPanic unless every given row equals its frames (tests and fsck-style checks)."""
        for asid, frames in zip(asids, frame_lists):
            row = self.table[self.row_of[asid]]
            if list(row[:len(frames)]) != list(frames) or row[len(frames):].any():
                raise KernelPanic(f"PageRows.check: the row of address space {asid} is not its frames")
