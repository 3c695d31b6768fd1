"""The FP8 base's per-step work on the GPU as Triton kernels: each activation's and output gradient's quantization
by rows, the frozen weight's transpose for the backward, and a 4-bit weight's e4m3 values where its matmuls run in
FP8 (--fp8_matmuls) (finetune/fp8.py calls them on a CUDA device).

Why our own rather than torch.compile's: each compiled call costs the CPU a guard check and a wrapper (46-51 against
22-26 us a call, H100, 2026-12-06), where the FP8 step's backward has barely more GPU than CPU time per layer; and
with chunk sizes of our choosing they quantize StarCoder-15B's output gradients 10-37% faster and transpose its
weights in a third to a half less time (bench/fp8_gemms.py; docs/PERFORMANCE.md). The values are bit for bit those
of fp8._quantize_rows on the GPU.
"""

import torch
import triton
import triton.language as tl

from .fp8 import E4M3, E4M3_MAX, kernel_unpacks

# (values a chunk, warps) by row width: the fastest of bench/fp8_gemms.py's sweep on an H100 (2026-12-06) at 8,192
# rows of StarCoder-15B's widths: 1,024 and 4 up to 8,192 wide, 4,096 and 16 beyond. A row wider than its chunk is
# read twice, for its amax and then to scale it, the second time from L2.
NARROW, WIDE = (1024, 4), (4096, 16)


@triton.jit
def _tanh_gelu(x):
    """x/2 (1 + tanh u), u = sqrt(2/pi) (x + 0.044715 x^3) (Hendrycks and Gimpel 2016, eq. 3; PyTorch's
    approximate="tanh"), in fp32, with 1 + tanh u = 2 / (1 + exp(-2u)): Triton's CPU interpreter has exp but no tanh,
    and where tanh u is near -1 (x below about -3) this keeps the precision that 1 + tanhf(u) loses."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp(-2.0 * u))  # exp overflows to inf, the quotient to 0, for x below about -10


@triton.jit
def _chunk(row, column_scale, start, width: tl.constexpr, has_column_scale: tl.constexpr, block: tl.constexpr):
    """Columns start..start+block of a row in fp32, times their column factors: (values, columns, inside)."""
    columns = start + tl.arange(0, block)
    inside = columns < width
    v = tl.load(row + columns, mask=inside, other=0.0).to(tl.float32)
    if has_column_scale:
        v = v * tl.load(column_scale + columns, mask=inside, other=0.0)
    return v, columns, inside


@triton.jit
def _quantize_rows_kernel(x, column_scale, values, scales, gelu_out, x_stride, width: tl.constexpr,
                          e4m3_max: tl.constexpr, has_column_scale: tl.constexpr, gelu: tl.constexpr,
                          block: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    source, target = x + row * x_stride, values + row * width
    activations = gelu_out + row * width
    amax = tl.zeros((block,), tl.float32)
    for start in range(0, width, block):  # the row's amax
        v, columns, inside = _chunk(source, column_scale, start, width, has_column_scale, block)
        if gelu:  # quantize the GELU's output as the model holds it, in x's dtype, which is stored for the rest
            activation = _tanh_gelu(v).to(gelu_out.dtype.element_ty)
            tl.store(activations + columns, activation, mask=inside)
            v = activation.to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    # as PyTorch computes it: amax times the reciprocal of 448, then a correctly rounded division
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) * (1.0 / e4m3_max)
    if gelu:  # what one thread of the program wrote, another may read next
        tl.debug_barrier()
    for start in range(0, width, block):  # the row again (the GELU's output, just written), scaled
        v, columns, inside = _chunk(activations if gelu else source, column_scale, start, width, has_column_scale,
                                    block)
        q = tl.clamp(tl.math.div_rn(v, scale), -e4m3_max, e4m3_max)
        tl.store(target + columns, q.to(values.dtype.element_ty), mask=inside)
    tl.store(scales + row, scale)


def quantize_rows(x: torch.Tensor, column_scale: torch.Tensor | None = None, chunk: tuple[int, int] | None = None,
                  gelu_out: torch.Tensor | None = None):
    """fp8._quantize_rows in one kernel: `x` (rows, columns), optionally times a per-column factor, as e4m3 with one
    fp32 scale per row. With `gelu_out` (x's shape and dtype, contiguous), the rows quantized are x's tanh GELU, which
    the kernel also writes there. `chunk` (values, warps) overrides the choice by width (the bench's sweep)."""
    if x.stride(1) != 1:
        x = x.contiguous()
    rows, width = x.shape
    values = torch.empty(rows, width, dtype=E4M3, device=x.device)
    scales = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    block, num_warps = chunk or (NARROW if width <= 8192 else WIDE)
    has_column_scale = column_scale is not None
    column_scale = column_scale.reshape(-1).float() if has_column_scale else scales  # else: never read
    gelu = gelu_out is not None
    _quantize_rows_kernel[(rows,)](x, column_scale, values, scales, gelu_out if gelu else x, x.stride(0), width,
                                   E4M3_MAX, has_column_scale, gelu, block, num_warps=num_warps)
    return values, scales


@triton.jit
def _transpose_kernel(source, target, rows, columns, block_rows: tl.constexpr, block_columns: tl.constexpr):
    r = tl.program_id(0) * block_rows + tl.arange(0, block_rows)
    c = tl.program_id(1) * block_columns + tl.arange(0, block_columns)
    inside = (r[:, None] < rows) & (c[None, :] < columns)
    tile = tl.load(source + r[:, None].to(tl.int64) * columns + c[None, :], mask=inside)
    tl.store(target + c[None, :].to(tl.int64) * rows + r[:, None], tile, mask=inside)


def transposed(weight: torch.Tensor, block_rows: int = 128, block_columns: int = 128) -> torch.Tensor:
    """weight.t().contiguous() of a contiguous 2-D weight, in tiles of 128 x 128 bytes."""
    rows, columns = weight.shape
    source = weight.view(torch.uint8)  # a byte copy: no FP8 arithmetic
    target = torch.empty(columns, rows, dtype=torch.uint8, device=weight.device)
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(columns, block_columns))
    _transpose_kernel[grid](source, target, rows, columns, block_rows, block_columns)
    return target.view(weight.dtype)


@triton.jit
def _from_nf4_kernel(packed, code, absmax, nested_code, nested_absmax, offset, row_scales, values, rows, columns,
                     blocksize: tl.constexpr, nested_blocksize: tl.constexpr, nested: tl.constexpr,
                     transpose: tl.constexpr, e4m3_max: tl.constexpr, block_rows: tl.constexpr,
                     block_columns: tl.constexpr):
    # A tile of whole blocks (64 values in every StarCoder weight). Each block's factor, its absmax over its row's
    # scale, is found once per block rather than per value: with double quantization that is three gathers and a
    # division.
    blocks: tl.constexpr = block_columns // blocksize
    r = tl.program_id(0) * block_rows + tl.arange(0, block_rows)
    b = tl.program_id(1) * blocks + tl.arange(0, blocks)
    in_rows = r < rows
    inside = in_rows[:, None] & (b[None, :] < columns // blocksize)
    block = r[:, None].to(tl.int64) * (columns // blocksize) + b[None, :]
    if nested:  # double quantization: each block's absmax is itself 8-bit, with a scale per nested block
        scale = tl.load(nested_code + tl.load(absmax + block, mask=inside, other=0).to(tl.int32))
        scale = scale * tl.load(nested_absmax + block // nested_blocksize, mask=inside, other=0.0) + tl.load(offset)
    else:
        scale = tl.load(absmax + block, mask=inside, other=0.0)
    scale = scale / tl.load(row_scales + r, mask=in_rows, other=1.0)[:, None]
    # two values a byte, the first in the high nibble (bitsandbytes packs the row-major weight)
    c = tl.program_id(1) * (block_columns // 2) + tl.arange(0, block_columns // 2)
    in_bytes = in_rows[:, None] & (c[None, :] < columns // 2)
    byte = tl.load(packed + r[:, None].to(tl.int64) * (columns // 2) + c[None, :], mask=in_bytes, other=0)
    byte = byte.to(tl.int32)
    level = tl.reshape(tl.join(tl.load(code + (byte >> 4)), tl.load(code + (byte & 15))), (block_rows, block_columns))
    v = tl.reshape(tl.reshape(level, (block_rows, blocks, blocksize)) * scale[:, :, None], (block_rows, block_columns))
    q = tl.clamp(v, -e4m3_max, e4m3_max).to(values.dtype.element_ty)
    column = tl.program_id(1) * block_columns + tl.arange(0, block_columns)
    stored = in_rows[:, None] & (column[None, :] < columns)
    if transpose:  # written along the rows of the transpose, so that neighbouring threads write neighbouring bytes
        tl.store(values + column[:, None].to(tl.int64) * rows + r[None, :], tl.trans(q), mask=tl.trans(stored))
    else:
        tl.store(values + r[:, None].to(tl.int64) * columns + column[None, :], q, mask=stored)


def from_nf4(packed: torch.Tensor, state, row_scales: torch.Tensor, transpose: bool = False,
             block_rows: int = 64, block_columns: int = 256, num_warps: int = 8) -> torch.Tensor:
    """fp8.from_4bit in one kernel: a bitsandbytes NF4/FP4 weight (`packed`, its QuantState `state`) whose rows are
    whole blocks, as e4m3 with a scale per row, (out, in) or with `transpose` (in, out); reads the 4 bits once and
    writes the 8, where unpacking to bf16 and quantizing that reads and writes 5.5 bytes a weight."""
    if not kernel_unpacks(state) or block_columns % state.blocksize:
        raise ValueError(f"from_nf4 takes rows of whole blocks of at most 256 values, each tile whole blocks; got "
                         f"{state.shape[1]} columns in blocks of {state.blocksize}, tiles {block_columns} wide")
    rows, columns = state.shape
    values = torch.empty((columns, rows) if transpose else (rows, columns), dtype=E4M3, device=packed.device)
    nested = state.nested
    inner = state.state2 if nested else state  # unread where not nested
    offset = state.offset if nested else state.absmax  # a tensor: read on the GPU, no synchronization
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(columns, block_columns))
    _from_nf4_kernel[grid](packed, state.code, state.absmax, inner.code, inner.absmax, offset, row_scales, values,
                           rows, columns, state.blocksize, inner.blocksize, nested, transpose, E4M3_MAX, block_rows,
                           block_columns, num_warps=num_warps)
    return values
