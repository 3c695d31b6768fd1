"""LoRA's low-rank term added into a full-width tensor in place, `out += down @ up`, as one Triton kernel on a GPU:
the forward's B term into the base layer's output, and the backward's A term into the input gradient
(finetune/fusion.py).

Why our own: with a rank of 16 the product is cheap and the cost is reading and writing `out` once, which cuBLAS's
addmm_ does at about 55% of an H100's memory bandwidth; one tile of `out` per program, its rank-r product made in
registers, is a plain streaming pass: 0.08 against 0.11 ms at 8,192 x 6,144, 0.34 against 0.43 ms at 8,192 x 24,576,
and `--recipe fp8` 1.1% faster (bench/fp8_gemms.py, bench/recipes.py; docs/PERFORMANCE.md, H100, 2026-12-06). The
product is accumulated in fp32 and added to `out` in fp32, rounded once; addmm_'s sums agree with it in 70% of the
values, the rest rounded otherwise.
"""

import torch
import triton
import triton.language as tl

# (rows, columns) of `out` a program, from bench/fp8_gemms.py's sweep on an H100 (2026-12-06): within 5% of the
# fastest block for every output, 11% for the widest input gradient (32 x 512 wins there, loses on outputs); 64 x 256,
# as fast on outputs, was 40-50% slower on input gradients (A contiguous) and gave the step nothing.
BLOCK = (128, 128)


@triton.jit
def _add_low_rank_kernel(out, down, up, rows, columns, rank, out_stride, down_stride_r, down_stride_k, up_stride_k,
                         up_stride_c, block_rows: tl.constexpr, block_columns: tl.constexpr, block_rank: tl.constexpr):
    r = tl.program_id(0) * block_rows + tl.arange(0, block_rows)
    c = tl.program_id(1) * block_columns + tl.arange(0, block_columns)
    k = tl.arange(0, block_rank)
    d = tl.load(down + r[:, None].to(tl.int64) * down_stride_r + k[None, :] * down_stride_k,
                mask=(r[:, None] < rows) & (k[None, :] < rank), other=0.0)
    u = tl.load(up + k[:, None] * up_stride_k + c[None, :] * up_stride_c,
                mask=(k[:, None] < rank) & (c[None, :] < columns), other=0.0)
    inside = (r[:, None] < rows) & (c[None, :] < columns)
    target = out + r[:, None].to(tl.int64) * out_stride + c[None, :]
    # in fp32 (TF32 tensor cores: exact for 16-bit inputs, whose mantissas fit TF32's), as Triton's CPU interpreter
    # has no bf16 product for tests to check
    total = tl.load(target, mask=inside).to(tl.float32) + tl.dot(d.to(tl.float32), u.to(tl.float32))
    tl.store(target, total.to(out.dtype.element_ty), mask=inside)


def add_low_rank_(out: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                  block: tuple[int, int] | None = None) -> torch.Tensor:
    """out.addmm_(down, up) for `out` (rows, columns) in 16 bits with each row contiguous, `down` (rows, r) and `up`
    (r, columns) in out's dtype, each in any layout. `block` (rows, columns) overrides BLOCK (the bench's sweep)."""
    rows, columns = out.shape
    rank = down.shape[1]
    block_rows, block_columns = block or BLOCK
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(columns, block_columns))
    _add_low_rank_kernel[grid](out, down, up, rows, columns, rank, out.stride(0), *down.stride(), *up.stride(),
                               block_rows, block_columns, max(16, triton.next_power_of_2(rank)))
    return out
