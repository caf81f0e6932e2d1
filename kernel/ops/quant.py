"""Weight-only int4 GEMMs for quantized programs: y = x @ W^T with W in 4-bit groups.

W (n, k) is stored as codes q in 0..15 with, per group of `group` values along k, a scale
s and a zero z: W[n, j] = (q[n, j] - 8) * s + z. That is torch's groupwise int4 layout and
it holds a GGUF Q4_0 block (s = d, z = 0) or Q4_1 block (value d*q + m: s = d, z = m + 8d)
without loss of the codes. On the CPU the GEMM is torch's `_weight_int4pack_mm_for_cpu`,
which streams the packed weights with AVX-512 at small M (measured against MKL fp32 and
bf16 in docs/performance.md); its fast path wants bf16 activations and bf16 scales, so x is
rounded to bf16 once and the result comes back in bf16. reference.int4_mm is the twin.

The packed form is opaque (torch's CPU tiling): make it with int4_pack, never by hand.
"""
import torch

from kernel.ops import validate as val

GROUPS = (32, 64, 128, 256)


def int4_pack(codes: torch.Tensor) -> torch.Tensor:
    """codes: int32 (n, k), values 0..15, n a multiple of 16 and k of 64 -> the packed uint8 form."""
    val.tensor("codes", codes, ndim=2, dtypes=(torch.int32,), device=torch.device("cpu"))
    n, k = codes.shape
    if n % 16 or k % 64:
        val.fail(f"int4 weights need n % 16 == 0 and k % 64 == 0, not ({n}, {k})")
    if codes.numel():
        lo, hi = torch.aminmax(codes)
        if int(lo) < 0 or int(hi) > 15:
            val.fail(f"int4 codes must lie in 0..15, not {int(lo)}..{int(hi)}")
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """x (m, k) bf16 @ W^T -> (m, n) bf16; packed from int4_pack, scale_zeros bf16 (k / group, n, 2)."""
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.device.type != "cpu":
        val.fail(f"x must be a 2-D bf16 cpu tensor, not {x.dim()}-D {x.dtype} on {x.device}")
    n = packed.shape[0]
    k = x.shape[1]
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (n, k // 2):
        val.fail(f"packed has shape {tuple(packed.shape)} {packed.dtype}, x has k={k}")
    if group not in GROUPS or k % group:
        val.fail(f"group {group} must be one of {GROUPS} and divide k={k}")
    if scale_zeros.dtype != torch.bfloat16 or tuple(scale_zeros.shape) != (k // group, n, 2):
        val.fail(f"scale_zeros has shape {tuple(scale_zeros.shape)} {scale_zeros.dtype}, "
                 f"expected ({k // group}, {n}, 2) bf16")
    if not x.is_contiguous():
        x = x.contiguous()
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_zeros)
