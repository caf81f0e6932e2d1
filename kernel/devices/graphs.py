"""Decode graphs: pure-decode steps through static buffers, captured as one CUDA graph per batch size.

step.forward hands the runner a checked HostBatch (kernel/batch.py) of one program; takes() says
whether it runs it. A pure-decode batch of n sequences goes to the smallest size b >= n of
graph_sizes() (1, 2, 4, 8, then multiples of 16): rows n..b-1 are padding, 1-token sequences at
position 0 whose K/V goes to the kernel's null frame and whose page-table row is that frame alone,
so no real row reads it. The padded arrays are copied into static device buffers of fixed shape (the
page table is as wide as the model's context over the page size) and the program's forward runs over
views of them: replayed from its captured graph when capture is on (CUDA), called eagerly otherwise
(the CPU, or graphs="eager"). Steps with prefill, larger batches and wider page tables run eagerly
through the device. Sampling, stop checks and commit stay outside: one device-to-host copy a step.
The logits returned are valid until the next step (every graph of a program copies its logits into
the first rows of one static buffer).
"""
import time
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from kernel.batch import ForwardBatch, HostBatch
from kernel.errors import KernelPanic

WARMUP = 2          # eager runs on the capture stream before a capture: CuPy compiles, cuBLAS picks algorithms


def graph_sizes(max_batch: int) -> list:
    """The batch sizes that get a graph: 1, 2, 4, 8, then steps of 16 up to max_batch (rounded up)."""
    sizes = []
    for s in (1, 2, 4, 8):
        sizes.append(s)
        if s >= max_batch:
            return sizes
    return sizes + list(range(16, -(-max_batch // 16) * 16 + 1, 16))


def padded_size(sizes: list, n: int) -> int | None:
    """The smallest size >= n, or None when n is larger than every size."""
    return next((s for s in sizes if s >= n), None)


@dataclass
class GraphStats:
    """What the runner did: for the device script and tests."""
    static_steps: int = 0           # decode steps through the static buffers (replayed or eager)
    replays: int = 0                # of which replayed from a captured graph
    eager_steps: int = 0            # steps the runner left to the eager path (prefill, too large)
    padding_rows: int = 0           # rows added to reach a graph size, over all static steps
    captures: dict = field(default_factory=dict)   # size -> (seconds to warm up and capture, bytes of pool growth)


class _Static:
    """One program's static buffers (max_batch rows) and its captured graphs, by size."""

    def __init__(self, program, device: torch.device, max_batch: int, width: int, null_frame: int,
                 page_size: int):
        self.program = weakref.ref(program)
        self.width, self.null_frame, self.page_size = width, null_frame, page_size
        on = dict(device=device)
        self.token_ids = torch.zeros(max_batch, dtype=torch.int64, **on)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, **on)
        self.slot_mapping = torch.full((max_batch,), null_frame * page_size, dtype=torch.int32, **on)
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, **on)
        self.page_table = torch.full((max_batch, width), null_frame, dtype=torch.int32, **on)
        # Constant for pure decode: row i is sequence i, and every row's logits come back.
        self.query_start = torch.arange(max_batch + 1, dtype=torch.int32, **on)
        self.sample_indices = torch.arange(max_batch, dtype=torch.int64, **on)
        # Host staging (pinned on CUDA, so each field is one asynchronous copy). Before the staging is
        # written again, the previous step's copies out of it must be done: usually the step's sampled
        # tokens coming back have waited for them already, but a step that samples nothing does not,
        # so an event marks the copies and fill() waits for it.
        pin = device.type == "cuda"
        self.copied = torch.cuda.Event() if pin else None
        self.staged = {name: torch.empty(getattr(self, name).shape, dtype=getattr(self, name).dtype,
                                         pin_memory=pin)
                       for name in ("token_ids", "positions", "slot_mapping", "context_lens", "page_table")}
        self.graphs: dict = {}           # size -> (torch.cuda.CUDAGraph, its logits: a view of self.logits)
        # Every graph of the program copies its logits into the first b rows of this one buffer (made at
        # the first capture, when their width and dtype are known), so the logits held between steps
        # are max_batch rows, not a tensor per size (the sum over sizes to 256 is 2,191 rows: ~430 MiB
        # for SmolLM2's vocabulary); the forward's own output is freed inside the capture, back to the
        # shared pool, where the next capture reuses it.
        self.logits = None

    def fill(self, host: HostBatch, b: int) -> None:
        """Stage the n real rows and b - n padding rows, then copy them to the static buffers."""
        n, s = host.num_seqs, self.staged
        if self.copied is not None:
            self.copied.synchronize()
        arrays = {name: t.numpy() for name, t in s.items()}
        arrays["token_ids"][:n] = host.token_ids
        arrays["token_ids"][n:b] = 0
        arrays["positions"][:n] = host.positions
        arrays["positions"][n:b] = 0
        arrays["slot_mapping"][:n] = host.slot_mapping
        arrays["slot_mapping"][n:b] = self.null_frame * self.page_size
        arrays["context_lens"][:n] = host.context_lens
        arrays["context_lens"][n:b] = 1
        table = arrays["page_table"]
        table[:b] = self.null_frame          # unused columns of real rows too: never read (context)
        table[:n, :host.page_table.shape[1]] = host.page_table
        for name, staged in s.items():
            getattr(self, name)[:b].copy_(staged[:b], non_blocking=True)
        if self.copied is not None:
            self.copied.record()

    def batch(self, b: int) -> ForwardBatch:
        """Views of the first b rows, as the forward reads them (checked: the builder did it on the host)."""
        return ForwardBatch(token_ids=self.token_ids[:b], positions=self.positions[:b],
                            slot_mapping=self.slot_mapping[:b], page_table=self.page_table[:b],
                            query_start=self.query_start[:b + 1], context_lens=self.context_lens[:b],
                            sample_indices=self.sample_indices[:b], max_query_len=1,
                            max_context_len=self.width * self.page_size, checked=True)


class DecodeGraphs:
    """The runner of one kernel: static buffers per program, graphs per (program, size) when capturing.

    capture: record CUDA graphs (needs a CUDA device); without it the same padded static batches run
    eagerly, which is what the CPU tests check against the unpadded eager step."""

    def __init__(self, device, null_frame: int, max_batch: int, capture: bool):
        torch_device = getattr(device, "torch_device", None)
        if torch_device is None:
            raise KernelPanic(f"DecodeGraphs: device {device.name} holds no tensors")
        if capture and torch_device.type != "cuda":
            raise KernelPanic(f"DecodeGraphs: capture needs a CUDA device, not {torch_device}")
        self.device, self.torch_device = device, torch_device
        self.null_frame = null_frame
        self.sizes = graph_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.capture = capture
        self.stats = GraphStats()
        self._static: dict = {}          # id(program) -> _Static
        # One memory pool shared by every graph: a later capture may reuse blocks an earlier graph frees
        # at its end (its scratch, the forward's own logits among them), so a replay may overwrite
        # another graph's scratch; harmless, because graphs never run at once and their outputs are
        # copied into the program's static logits, outside the pool.
        self._pool = None
        self._stream = None              # the warm-up and capture stream, one for every capture

    def takes(self, program, host: HostBatch, kv) -> bool:
        """Whether this step is one the runner runs: pure decode, a size it has, a table that fits."""
        width = -(-program.max_context // kv.page_size)
        ok = (host.pure_decode and 0 < host.num_seqs <= self.max_batch and host.page_table.shape[1] <= width)
        if not ok:
            self.stats.eager_steps += 1
        return ok

    def forward(self, program, host: HostBatch, kv) -> tuple:
        """(logits of host.sample_indices' rows, as program.forward gives them for the unpadded batch;
        the padding rows added)."""
        static = self._static_of(program, kv)
        n = host.num_seqs
        b = padded_size(self.sizes, n)
        static.fill(host, b)
        self.stats.static_steps += 1
        self.stats.padding_rows += b - n
        if self.capture:
            graph, logits = static.graphs.get(b) or self._capture(program, kv, static, b)
            graph.replay()
            self.stats.replays += 1
        else:
            logits = program.forward(static.batch(b), kv)
        rows = host.sample_indices
        if rows.shape[0] == n and np.array_equal(rows, np.arange(n)):
            return logits[:n], b - n     # pure decode draws from every row, in order: no gather
        return logits.index_select(0, torch.from_numpy(rows).to(logits.device, non_blocking=True)), b - n

    def _static_of(self, program, kv) -> _Static:
        static = self._static.get(id(program))
        if static is None or static.program() is not program:
            width = -(-program.max_context // kv.page_size)     # tokens per frame: the program's own
            static = self._static[id(program)] = _Static(program, self.torch_device, self.max_batch, width,
                                                         self.null_frame, kv.page_size)
        return static

    def _capture(self, program, kv, static: _Static, b: int):
        """Warm up on a side stream, then record the forward over the static views of size b.

        The warm-up runs are this step's forward (the static buffers hold it): they write the same K/V
        into the same slots the replay will, so running them changes nothing the step would not."""
        device = self.torch_device
        started = time.perf_counter()
        reserved = torch.cuda.memory_reserved(device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        batch = static.batch(b)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP):
                warm = program.forward(batch, kv)
        torch.cuda.current_stream(device).wait_stream(stream)
        if static.logits is None:               # outside the graphs' pool: no capture's scratch reuses it
            static.logits = torch.empty((self.max_batch, warm.shape[1]), dtype=warm.dtype, device=device)
        del warm
        logits = static.logits[:b]
        graph = torch.cuda.CUDAGraph()
        # The capture stream is the warm-up stream: CuPy's launcher has already wrapped it.
        with torch.cuda.graph(graph, pool=self._pool, stream=stream):
            logits.copy_(program.forward(batch, kv))
        torch.cuda.synchronize(device)
        static.graphs[b] = (graph, logits)
        self.stats.captures[b] = (time.perf_counter() - started, torch.cuda.memory_reserved(device) - reserved)
        return graph, logits
