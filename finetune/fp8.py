"""The frozen base in FP8: weights stored as e4m3 with one scale per output row, multiplied on FP8 tensor cores.

LoRA trains only its adapters, so the base's weights never change: they are quantized once, at load, and only the
activations (forward) and output gradients (backward) are quantized each step, each row with its own dynamic scale.
The frozen weight needs no weight gradient, so the backward is one GEMM (the input gradient) and the forward saves no
activation for it.

Why our own autograd function over `torch._scaled_mm` rather than a library: torchao's float8 training keeps a
16-bit weight and casts it again every step (a frozen base would be stored twice over and re-quantized each step),
and transformers' and peft's FP8 support is inference-only. Needs compute capability >= 8.9 (Ada, Hopper, Blackwell;
NVIDIA's Hopper and Ada whitepapers): not the A100, whose tensor cores have no FP8.
"""

import copy
import types

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
MIN_CAPABILITY = (8, 9)


def unsupported_reason() -> str | None:
    """Why FP8 matmuls cannot run here, or None if they can."""
    if not torch.cuda.is_available():
        return "this machine has no CUDA GPU"
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name()} has compute capability {capability[0]}.{capability[1]} and no FP8 "
                f"tensor cores (they need 8.9 or newer: Ada, Hopper, Blackwell)")
    return None


def _quantize_rows(x: torch.Tensor, column_scale: torch.Tensor | None = None):
    """`x` (rows, columns), optionally times a per-column factor, as e4m3 with one scale per row: (values, scales)."""
    x = x.float() if column_scale is None else x.float() * column_scale
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


# On a GPU both per-step passes are our Triton kernels (finetune/fp8_kernels.py: less CPU time a call than a compiled
# function's, and faster); inside a compiled layer (--compile_layers) the plain code fuses into the layer's graph.
def quantize_rows(x: torch.Tensor, column_scale: torch.Tensor | None = None, gelu_out: torch.Tensor | None = None):
    """With `gelu_out` (x's shape and dtype, contiguous), the rows quantized are x's tanh GELU, also written there: on
    a GPU in the same pass, which reads x once (an MLP's down projection, finetune/fusion.py)."""
    if not x.is_cuda or torch.compiler.is_compiling():
        if gelu_out is not None:
            x = gelu_out.copy_(torch.nn.functional.gelu(x, approximate="tanh"))
        return _quantize_rows(x, column_scale)
    from . import fp8_kernels  # Triton, which a CUDA machine's torch brings

    return fp8_kernels.quantize_rows(x, column_scale, gelu_out=gelu_out)


def transposed(weight: torch.Tensor) -> torch.Tensor:
    if not weight.is_cuda or torch.compiler.is_compiling():
        return weight.t().contiguous()
    from . import fp8_kernels

    return fp8_kernels.transposed(weight)


# Both GEMMs use Hopper's fast FP8 accumulation: `--recipe fp8` on StarCoder-15B trains 7% faster with it (13,508
# against 12,635 and 12,564 tokens/s on one H200, one call; docs/PERFORMANCE.md, 2026-12-06), and still learns what a
# bf16 base learns (training losses within 0.14% over 200 steps, bench/fp8_quality.py).
def forward_rows(rows, weight, weight_scale, bias=None, gelu_out=None):
    """rows W^T + b, W frozen in FP8 as Float8Linear stores it: (out, in) e4m3 with a scale per output row, so that
    W = diag(s) Wq (or a 4-bit weight with its row scales, made e4m3 now: as_e4m3). The rows and Wq^T are both
    contiguous along `in`, the layout FP8 tensor cores need. With `gelu_out`, gelu(rows) W^T + b, gelu(rows) written
    to `gelu_out` (quantize_rows)."""
    values, scales = quantize_rows(rows, gelu_out=gelu_out)
    bias = None if bias is None else bias.to(rows.dtype)  # _scaled_mm adds it in the output's dtype
    return torch._scaled_mm(values, as_e4m3(weight, weight_scale).t(), scale_a=scales,
                            scale_b=weight_scale.view(1, -1), bias=bias, out_dtype=rows.dtype, use_fast_accum=True)


def input_grad_rows(grad_rows, weight, weight_scale):
    """The input gradient of forward_rows, dy W = dy diag(s) Wq: s folds into dy's columns before dy is quantized by
    rows, and Wq is transposed for this GEMM, (in, out), contiguous along `out`, the dimension the input gradient sums
    over (as_e4m3: a copy per layer and step, instead of a second stored copy of the base)."""
    values, scales = quantize_rows(grad_rows, column_scale=weight_scale.view(1, -1))
    weight_t = as_e4m3(weight, weight_scale, transpose=True)
    return torch._scaled_mm(values, weight_t.t(), scale_a=scales,
                            scale_b=torch.ones(1, weight_t.shape[0], device=weight_t.device), out_dtype=grad_rows.dtype,
                            use_fast_accum=True)


def frozen_rows(rows, weight, weight_scale, bias=None):
    """rows W^T + b, W frozen: in FP8 with its row scales (forward_rows), else 16-bit or 4-bit, unpacked to 16 bits."""
    if weight_scale is not None:
        return forward_rows(rows, weight, weight_scale, bias)
    return torch.nn.functional.linear(rows, dequantized(weight), None if bias is None else bias.to(rows.dtype))


def frozen_input_grad_rows(grad_rows, weight, weight_scale):
    """The input gradient of frozen_rows."""
    if weight_scale is not None:
        return input_grad_rows(grad_rows, weight, weight_scale)
    return grad_rows @ dequantized(weight)


class _FrozenMatmul(torch.autograd.Function):
    """y = x W^T + b with W frozen (frozen_rows). The backward is the input gradient only, and the forward saves no
    activation for it. `unread`: a recompute that reads only what this saves (finetune/fusion.py's skip_unread), so
    the same weight saved, no GEMM, an output never written."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias, unread: bool):
        ctx.save_for_backward(weight, weight_scale)
        if unread:
            out_features = (weight.quant_state.shape if hasattr(weight, "quant_state") else weight.shape)[0]
            return x.new_empty(*x.shape[:-1], out_features)
        return frozen_rows(x.reshape(-1, x.shape[-1]), weight, weight_scale, bias).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        weight, weight_scale = ctx.saved_tensors
        grad_in = frozen_input_grad_rows(grad_out.reshape(-1, grad_out.shape[-1]), weight, weight_scale)
        return grad_in.view(*grad_out.shape[:-1], -1), None, None, None, None


def frozen_matmul(x, weight, weight_scale, bias, unread: bool = False):
    """x W^T + b, W frozen, as one autograd function (_FrozenMatmul)."""
    return _FrozenMatmul.apply(x, weight, weight_scale, bias, unread)


class Float8Linear(torch.nn.Linear):
    """A frozen linear layer stored and multiplied in FP8. A subclass of nn.Linear, as bitsandbytes' layers are, so
    code that finds a model's linear layers (LoRA targets, the FLOPs counter) finds it too."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias=False, device="meta")
        values, scales = _quantize_rows(weight.detach())
        self.weight = torch.nn.Parameter(values, requires_grad=False)
        self.register_buffer("weight_scale", scales.view(-1), persistent=False)
        # _scaled_mm adds a bias in the output dtype; the frozen bias stays in the model's dtype
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x):
        return frozen_matmul(x, self.weight, self.weight_scale, self.bias)


def dequantized(weight) -> torch.Tensor:
    """A frozen weight in 16 bits: a 16-bit one as it is, bitsandbytes' 4-bit one unpacked."""
    if hasattr(weight, "quant_state"):  # bitsandbytes Params4bit
        import bitsandbytes

        return bitsandbytes.functional.dequantize_4bit(weight.data, weight.quant_state)
    return weight.data


# --fp8_matmuls: a 4-bit base multiplied in FP8. Its e4m3 values are made each time a layer multiplies and never
# stored (a 16 GB card holds StarCoder-15B in NF4, 7.6 GiB, but not in FP8, 15.1 GiB); each row's scale, which the
# frozen weight fixes, is found once.
def unpacked_fp32(weight) -> torch.Tensor:
    """A bitsandbytes 4-bit weight unpacked in fp32: each value its level times its block's absmax, not rounded to 16
    bits."""
    import bitsandbytes

    state = copy.copy(weight.quant_state)
    state.dtype = torch.float32
    return bitsandbytes.functional.dequantize_4bit(weight.data, state)


def row_scales_of_4bit(weight) -> torch.Tensor:
    """The scale per row (out,) that _quantize_rows gives a bitsandbytes 4-bit weight unpacked in fp32."""
    return _quantize_rows(unpacked_fp32(weight))[1].view(-1)


def kernel_unpacks(state) -> bool:
    """Whether finetune/fp8_kernels.py's from_nf4 takes a 4-bit weight of this QuantState: each row whole blocks of
    at most 256 values (every StarCoder weight: blocks of 64, bitsandbytes' default), which its tiles hold whole."""
    return state.blocksize <= 256 and state.shape[1] % state.blocksize == 0


def from_4bit(weight, row_scales: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """A bitsandbytes 4-bit weight as e4m3 with `row_scales` (row_scales_of_4bit): each value its level times its
    block's absmax over its row's scale, (out, in) as forward_rows takes them, or with `transpose` (in, out), as
    input_grad_rows does. On a GPU one kernel reads the 4 bits and writes the 8 (finetune/fp8_kernels.py)."""
    if not weight.is_cuda or torch.compiler.is_compiling() or not kernel_unpacks(weight.quant_state):
        values = (unpacked_fp32(weight) / row_scales.view(-1, 1)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
        return values.t().contiguous() if transpose else values
    from . import fp8_kernels

    return fp8_kernels.from_nf4(weight.data, weight.quant_state, row_scales, transpose)


def as_e4m3(weight, row_scales: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """The e4m3 values a frozen FP8 GEMM reads, (out, in) or with `transpose` (in, out): an FP8 weight as stored (its
    transpose a copy per layer and step), or a bitsandbytes 4-bit one (--fp8_matmuls) unpacked now."""
    if hasattr(weight, "quant_state"):
        return from_4bit(weight, row_scales, transpose)
    return transposed(weight) if transpose else weight


def _forward_4bit_in_fp8(self, x):
    return frozen_matmul(x, self.weight, self.fp8_row_scales, self.bias)


def multiply_4bit_in_fp8(model) -> int:
    """--fp8_matmuls: every bitsandbytes 4-bit layer of `model` (LoRA's bases, and the layers LoRA leaves alone:
    StarCoder's c_fc, 40% of its weights) multiplies in FP8 through from_4bit, with its row scales found now (as
    `fp8_row_scales`, which finetune/fusion.py's LoRA layers read too). Returns how many layers."""
    import bitsandbytes

    layers = [module for module in model.modules() if isinstance(module, bitsandbytes.nn.Linear4bit)]
    for layer in layers:
        layer.fp8_row_scales = row_scales_of_4bit(layer.weight)
        layer.forward = types.MethodType(_forward_4bit_in_fp8, layer)
    return len(layers)


def convert(model, device: torch.device | None = None, skip=("lora_A", "lora_B")) -> int:
    """Replace every frozen linear layer of `model` (LoRA's base layers, unadapted linears, a tied LM head) with a
    Float8Linear, on `device` (default: where the layer is); LoRA's own A and B stay as they are. Each layer moves
    to `device` in 16 bits only while it is quantized, so a model loaded on the CPU reaches a GPU that holds its FP8
    weights but not its 16-bit ones. Returns how many were replaced."""
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if (not isinstance(child, torch.nn.Linear) or isinstance(child, Float8Linear) or child_name in skip
                    or child.weight.requires_grad):
                continue
            bias = child.bias if child.bias is not None and not child.bias.requires_grad else None
            weight = dequantized(child.weight)
            if device is not None:
                weight, bias = weight.to(device), None if bias is None else bias.to(device)
            setattr(module, child_name, Float8Linear(weight, bias))
            replaced += 1
    return replaced
