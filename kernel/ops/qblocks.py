"""Small-M GEMMs on a GGUF's own blocks: y = x @ W^T with W in 32-wide blocks of 4- or 8-bit codes.

W (n, k) is held as codes u (0..15 or 0..255) with, per block of 32 along k, an fp16 scale d and
offset m: W[n, j] = d * u + m. That holds Q4_0 (m = -8d), Q4_1 (d, m) and Q8_0 (u = q + 128,
m = -128d) exactly, and Q4_K's sub-blocks with d*sc and -dmin*m rounded to fp16. qmm_pack makes
the layout the C kernel streams (csrc/cpu/qmm.c: tiles of 16 columns, a record per tile and block whose
64-byte vectors hold 16 columns x 4 consecutive k) once, at load; qmm_unpack reads it back.
x is float32; the kernel quantizes it per row and block to int8 (d = amax / 127, round to nearest
even) and returns float32: reference.qmm is the twin and says exactly what is computed.
`path` picks the CPU code: "auto" (AMX from 32 rows, 16 at 8 bits, where the CPU has it, else VNNI, else AVX2), "amx",
"vnni", "avx2" or "portable". AMX and VNNI give the same bits.
"""
import torch

from kernel.errors import ENOMEM, KvosError
from kernel.ops import validate as val

NR = 16         # columns per tile (csrc/cpu/qmm.c QMM_NR): one vector of 16 int32 / float lanes
BLOCK = 32      # elements per block along k: one record per tile and block
BITS = (4, 8)
PATHS = {"auto": 0, "portable": 1, "vnni": 2, "avx2": 3, "amx": 4}


def code_bytes(bits: int) -> int:
    """Bytes of one record's codes: 16 columns x 32 elements at 4 or 8 bits."""
    return 256 if bits == 4 else 512


def packed_shape(n: int, k: int, bits: int) -> tuple:
    """(tiles of NR columns, blocks of 32, bytes of one record: the codes, then NR fp16 d, then NR fp16 m)."""
    return (-(-n // NR), -(-k // BLOCK), code_bytes(bits) + 4 * NR)


def _check_bits_k(bits, k):
    if bits not in BITS:
        val.fail(f"qmm holds {BITS}-bit codes, not {bits}")
    if k % 32 or k <= 0:
        val.fail(f"qmm needs k a positive multiple of 32, not {k}")


def qmm_pack(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int) -> torch.Tensor:
    """codes integer (n, k) in 0..2^bits-1; d, m float (n, k / 32), stored as fp16 -> uint8 packed_shape."""
    val.tensor("codes", codes, ndim=2, device=torch.device("cpu"))
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        val.fail(f"codes must be an integer tensor, not {codes.dtype}")
    n, k = codes.shape
    _check_bits_k(bits, k)
    for name, t in (("d", d), ("m", m)):
        val.tensor(name, t, ndim=2, dtypes=(torch.float32, torch.float16), device=torch.device("cpu"))
        if tuple(t.shape) != (n, k // 32):
            val.fail(f"{name} has shape {tuple(t.shape)}, expected ({n}, {k // 32})")
        if not bool(torch.isfinite(t.half()).all()):
            val.fail(f"{name} holds values that are not finite in fp16")
    if codes.numel():
        lo, hi = torch.aminmax(codes)
        if int(lo) < 0 or int(hi) >= 1 << bits:
            val.fail(f"{bits}-bit codes must lie in 0..{(1 << bits) - 1}, not {int(lo)}..{int(hi)}")
    tiles, blocks, _ = packed_shape(n, k, bits)
    u = torch.zeros(tiles * NR, k, dtype=torch.uint8)
    u[:n] = codes.to(torch.uint8)
    # record vector j, byte 4c + i = column c's element 4j + i (tile, block, j, column, i)
    u = u.view(tiles, NR, blocks, 8, 4).permute(0, 2, 3, 1, 4)
    # 4-bit: vector j's codes in the low nibbles, vector j + 4's in the high ones
    c = (u[:, :, :4] | (u[:, :, 4:] << 4)) if bits == 4 else u
    s = torch.zeros(tiles * NR, blocks, 2, dtype=torch.float16)
    s[:n, :, 0], s[:n, :, 1] = d.half(), m.half()
    s = s.view(tiles, NR, blocks, 2).permute(0, 2, 3, 1).contiguous().view(torch.uint8)
    return torch.cat([c.reshape(tiles, blocks, -1), s.reshape(tiles, blocks, -1)], dim=2).contiguous()


def qmm_unpack(packed: torch.Tensor, n: int, k: int, bits: int) -> tuple:
    """The (codes int32 (n, k), d float32 (n, k/32), m float32 (n, k/32)) that qmm_pack packed."""
    _check_packed(packed, n, k, bits)
    tiles, blocks, _ = packed.shape
    cb = code_bytes(bits)
    c = packed[:, :, :cb].reshape(tiles, blocks, -1, NR, 4)
    if bits == 4:
        c = torch.cat([c & 15, c >> 4], dim=2)
    codes = c.permute(0, 3, 1, 2, 4).reshape(tiles * NR, k)[:n].to(torch.int32)
    s = packed[:, :, cb:].contiguous().view(torch.float16).view(tiles, blocks, 2, NR).permute(0, 3, 1, 2).float()
    s = s.reshape(tiles * NR, blocks, 2)[:n]
    return codes, s[..., 0].contiguous(), s[..., 1].contiguous()


def qmm_rows(packed: torch.Tensor, ids: torch.Tensor, n: int, k: int, bits: int) -> torch.Tensor:
    """Rows ids of W as float32 (len(ids), k), d * u + m per block, read from the packed records alone
    (a tied embedding's lookup on its head's blocks, csrc/cpu/qmm.c kvos_qmm_rows): qmm_unpack's values
    for those rows without unpacking the rest. reference.qmm_rows is the twin."""
    _check_packed(packed, n, k, bits)
    val.tensor("ids", ids, ndim=1, dtypes=(torch.int32, torch.int64), device=torch.device("cpu"))
    if ids.numel():
        lo, hi = torch.aminmax(ids)
        if int(lo) < 0 or int(hi) >= n:
            val.fail(f"row ids must lie in 0..{n - 1}, not {int(lo)}..{int(hi)}")
    from kernel.ops import cpu
    return cpu.qmm_rows(packed, ids.long().contiguous(), n, k, bits)


def _check_packed(packed, n, k, bits):
    _check_bits_k(bits, k)
    if not isinstance(n, int) or n <= 0:
        val.fail(f"qmm needs a positive column count n, not {n}")
    val.tensor("packed", packed, ndim=3, dtypes=(torch.uint8,))
    if tuple(packed.shape) != packed_shape(n, k, bits):
        val.fail(f"packed has shape {tuple(packed.shape)}, expected {packed_shape(n, k, bits)} "
                 f"for n={n}, k={k}, {bits}-bit")
    if not packed.is_contiguous():
        val.fail("packed must be contiguous")


def _plain_call(x, packed, n, bits, path, out) -> bool:
    """True for the everyday call (cpu float32 x with a dense last dimension, packed as qmm_pack
    made it for x's k, no out, auto path): every check of _check_call holds. Cheaper than
    _check_call by a few microseconds, which a decode step pays ~120 times."""
    return (out is None and path == "auto" and type(x) is torch.Tensor and type(packed) is torch.Tensor
            and x.dtype is torch.float32 and packed.dtype is torch.uint8 and x.dim() == 2
            and x.device.type == "cpu" and packed.device.type == "cpu" and x.stride(1) == 1
            and (bits == 4 or bits == 8) and type(n) is int and n > 0
            and (k := x.shape[1]) > 0 and k % 32 == 0
            and packed.shape == (-(-n // NR), k // BLOCK, code_bytes(bits) + 4 * NR)
            and packed.is_contiguous())


def _check_call(x, packed, n, bits, path, out):
    val.tensor("x", x, ndim=2, dtypes=(torch.float32,))
    _check_packed(packed, n, x.shape[1], bits)
    if packed.device != x.device:
        val.fail(f"x is on {x.device}, packed on {packed.device}")
    if path not in PATHS:
        val.fail(f"path must be one of {list(PATHS)}, not {path!r}")
    if out is not None:
        val.tensor("out", out, ndim=2, dtypes=(torch.float32,), device=x.device)
        if tuple(out.shape) != (x.shape[0], n):
            val.fail(f"out has shape {tuple(out.shape)}, expected ({x.shape[0]}, {n})")
        val.rows_contiguous("out", out)
    if x.device.type not in ("cpu", "cuda"):
        val.fail(f"qmm runs on cpu or cuda tensors, not {x.device.type}")


def qmm(x: torch.Tensor, packed: torch.Tensor, n: int, bits: int, *, path: str = "auto",
        out: torch.Tensor | None = None) -> torch.Tensor:
    """x float32 (rows, k) @ W^T -> float32 (rows, n), W from qmm_pack(codes, d, m, bits) of shape (n, k)."""
    if _plain_call(x, packed, n, bits, path, out):
        from kernel.ops import cpu
        return cpu.qmm(x, packed, n, bits, 0, torch.empty(x.shape[0], n))
    _check_call(x, packed, n, bits, path, out)
    if out is None:
        out = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.shape[0] == 0:
        return out
    if x.device.type == "cpu":
        from kernel.ops import cpu
        if path == "vnni" and not cpu.qmm_has_vnni():
            val.fail("this CPU has no AVX-512 VNNI: path='vnni' cannot run here")
        if path == "amx" and not cpu.qmm_has_amx():
            val.fail("this CPU (or its OS) gives no AMX-INT8 tiles: path='amx' cannot run here")
        if path == "avx2" and not cpu.qmm_has_avx2():
            val.fail("this CPU has no AVX2 with FMA and F16C: path='avx2' cannot run here")
        return cpu.qmm(x, packed, n, bits, PATHS[path], out)
    from kernel.ops import cuda
    return cuda.qmm(x, packed, n, bits, out)


class QmmWeights:
    """One packed weight checked once and bound to the C kernel for a program's life.

    A decode step runs ~120 GEMMs of a few microseconds of C each; through qmm() each also pays
    ~12 us of Python (four frames, the packed tensor's checks, pointer casts). A call here checks
    only x with a few attribute reads and passes the pointer made at load: ~6 us. Anything else
    (another dtype or device, strided rows, zero rows) goes through qmm() and its checks."""
    __slots__ = ("packed", "n", "k", "bits", "_lib", "_cast", "_w")

    def __init__(self, packed: torch.Tensor, n: int, k: int, bits: int):
        _check_packed(packed, n, k, bits)
        self.packed, self.n, self.k, self.bits = packed, n, k, bits
        self._lib = self._cast = self._w = None
        if packed.device.type == "cpu":
            from kernel.ops import cpu
            cpu.check_qmm_layout()
            self._lib, self._cast = cpu._load().lib, cpu._ext.ffi.cast
            self._w = self._cast("void *", packed.data_ptr())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x float32 (rows, k) @ W^T -> float32 (rows, n), as qmm(x, packed, n, bits)."""
        if not (type(x) is torch.Tensor and x.dtype is torch.float32 and x.is_cpu and x.dim() == 2
                and self._lib is not None):
            return qmm(x, self.packed, self.n, self.bits)
        m, k = x.shape
        row_stride, col_stride = x.stride()
        if k != self.k or col_stride != 1 or m == 0:
            return qmm(x, self.packed, self.n, self.bits)
        out = torch.empty(m, self.n)
        cast = self._cast
        if self._lib.kvos_qmm(cast("void *", out.data_ptr()), self.n, cast("void *", x.data_ptr()), row_stride,
                              m, k, self._w, self.n, self.bits, 0):
            raise KvosError(ENOMEM, "the C kernel could not allocate its scratch memory")
        return out
