"""Speed-ups that do in fewer kernels what the model does in several, each giving the same sums (tested against the
unfused path on the CPU); measured in docs/PERFORMANCE.md.

- `fuse_lora`: peft computes a LoRA layer as base(x) + B(A(x)) * scale: the B matmul, the scaling and the add are
  three kernels, two of them full passes over the layer's output. Here B, its scale and the add are one GEMM
  (`torch.addmm`, whose epilogue adds the base output), the scale folded into B's small (out x r) weight.
- `fuse_lora` over an FP8, 16-bit or 4-bit base also computes the whole layer in one autograd function whose backward
  adds LoRA's input gradient into the base's in place (in the GEMM's epilogue) instead of as a third tensor that
  autograd sums (no faster as measured: the epilogue still reads and writes the gradient). On a GPU both of its
  low-rank adds, into the output and into the input gradient, are our kernel (finetune/lora_kernels.py), which
  moves the full-width tensor faster than cuBLAS's addmm_. Where the layer is an MLP's down projection after a tanh
  GELU (StarCoder, StarCoder2), the GELU moves inside it, and over an FP8 base on a GPU it is computed in the pass
  that quantizes its output (finetune/fp8_kernels.py) instead of a pass of its own. With `recompute_gelu`
  only the GELU's input is kept for the backward and its output, LoRA's input, is recomputed there instead of held:
  24,576 values a token and layer on StarCoder-15B, 15 GiB at 4 x 2,048, for a second GELU pass (1.1% of an FP8
  step). finetune/memory.py turns it on where a run needs the memory.
- `fuse_lora(..., skip_unread=True)`: a checkpointed decoder layer's recompute runs its forward again only for the
  tensors its backward reads, and in StarCoder and StarCoder2 the MLP's down projection ends the layer: its output
  goes only into the residual sum, which saves nothing. So in the recompute that projection computes only what it
  saves (adapted: LoRA's down-projection, the GELU's output where kept; frozen, as StarCoder2's default targets
  leave it: its weight) and skips its GEMM: 40% of a StarCoder-15B layer's weights, 13% of a checkpointed layer's
  GEMM work. `lean` within 11.5 GiB trained 13% faster with it, StarCoder2-15B's with every layer checkpointed 9%
  (H100, 2026-12-07, docs/PERFORMANCE.md).
- `fuse_lora` also gives projections that read the same input (q, k and v; gate and up) one computation where the
  base is FP8: one GEMM over their stacked rows (per-row scales make the stacked weight exactly theirs; each layer's
  own weight becomes a view of it, so nothing is stored twice), one quantization of the input instead of three,
  LoRA's down-projections as one GEMM over their stacked A matrices and the up-projections through one
  block-diagonal B; in the backward one input-gradient GEMM instead of three and their sum.
- `compile_layers`: each decoder layer compiled with torch.compile (regional compilation: one layer's code, reused
  by the others), so the elementwise work around the GEMMs (layer norms, GELU, the FP8 layers' activation
  quantization, LoRA's adds) fuses into fewer kernels. GPUs only; the first steps pay the compilation.
"""

import functools
import types

import torch
from transformers.activations import ACT2CLS
from transformers.modeling_layers import GradientCheckpointingLayer

from . import fp8

# Projections of one block that read the same input: StarCoder2's, Llama's and Qwen2's attention, and the gated MLP.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# An MLP's activation and the down projection it feeds: StarCoder's and StarCoder2's (c_fc, act, c_proj).
ACTIVATION_THEN_DOWN = ("act", "c_proj")


def _plain_adapter(layer, x, args, kwargs) -> str | None:
    """The adapter a LoRA layer's forward runs in the plain case (one active adapter, no variant such as DoRA, not
    merged or disabled, no bias on B, the input in the adapter's dtype, no extra arguments); None otherwise."""
    names = layer.active_adapters
    name = names[0] if len(names) == 1 else None
    plain = (name in layer.lora_A and name not in layer.lora_variant and not (args or kwargs) and not layer.merged
             and not layer.disable_adapters and layer.lora_B[name].bias is None)
    return name if plain and layer.lora_A[name].weight.dtype == x.dtype else None


_gelu = functools.partial(torch.nn.functional.gelu, approximate="tanh")


def is_tanh_gelu(module) -> bool:
    """transformers' `gelu_pytorch_tanh` (StarCoder's and StarCoder2's activation) in its torch-kernel form."""
    return (isinstance(module, ACT2CLS["gelu_pytorch_tanh"])
            and getattr(getattr(module, "act", None), "keywords", None) == {"approximate": "tanh"})


def _base_forward(rows, weight, weight_scale, bias, gelu: bool):
    """(act(rows), act(rows) W^T + b), act the tanh GELU or the identity; an FP8 base (or a 4-bit one with row scales,
    multiplied in FP8) computes the GELU in the pass that quantizes its output (fp8.quantize_rows)."""
    if weight_scale is None:
        inputs = _gelu(rows) if gelu else rows
        return inputs, fp8.frozen_rows(inputs, weight, None, bias)
    gelu_out = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device) if gelu else None
    return rows if gelu_out is None else gelu_out, fp8.forward_rows(rows, weight, weight_scale, bias, gelu_out)


def _add_low_rank_(out, down, up):
    """out += down @ up in place: our kernel on a GPU where `out` is 16-bit with each row contiguous and the rank is
    at most 64 (a tile of a bigger one's `up` would not stay in registers) (finetune/lora_kernels.py); addmm_
    elsewhere and inside a compiled layer (which fuses its own)."""
    if (not out.is_cuda or torch.compiler.is_compiling() or out.dtype not in (torch.bfloat16, torch.float16)
            or out.stride(1) != 1 or down.dtype != out.dtype or up.dtype != out.dtype or down.shape[1] > 64):
        return out.addmm_(down, up)
    from . import lora_kernels  # Triton, which a CUDA machine's torch brings

    return lora_kernels.add_low_rank_(out, down, up)


class _LoraLinear(torch.autograd.Function):
    """act(x) W^T + b + (act(x) A^T) B^T, W frozen (FP8 with its row scales, 16-bit, or bitsandbytes 4-bit, which
    with row scales multiplies in FP8), LoRA's B already scaled, act the identity or tanh GELU (`gelu`), whose output
    is kept for the backward or, with `recompute`, computed again there."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, weight, weight_scale, bias, gelu: bool, recompute: bool, unread: bool):
        rows = x.reshape(-1, x.shape[-1])
        if unread:  # a recompute that reads only what this saves (skip_unread): no GEMM, an output never written
            inputs = _gelu(rows) if gelu else rows
            out = rows.new_empty(rows.shape[0], lora_b.shape[0])
        else:
            inputs, out = _base_forward(rows, weight, weight_scale, bias, gelu)
        down = inputs @ lora_a.t()
        if not unread:
            out = _add_low_rank_(out, down, lora_b.t())
        ctx.gelu = gelu
        kept = inputs if gelu and not recompute else None
        ctx.save_for_backward(rows, kept, down, lora_a, lora_b, weight, weight_scale)
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        rows, kept, down, lora_a, lora_b, weight, weight_scale = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_down = grad @ lora_b
        inputs = (_gelu(rows) if kept is None else kept) if ctx.gelu else rows
        grad_a = grad_down.t() @ inputs
        grad_b = grad.t() @ down
        grad_in = None
        if ctx.needs_input_grad[0]:  # not for the first block's input (the frozen embeddings')
            grad_in = _add_low_rank_(fp8.frozen_input_grad_rows(grad, weight, weight_scale), grad_down, lora_a)
            if ctx.gelu:
                grad_in = torch.ops.aten.gelu_backward(grad_in, rows, approximate="tanh")
            grad_in = grad_in.view(*grad_out.shape[:-1], -1)
        return grad_in, grad_a, grad_b, None, None, None, None, None, None


def _is_frozen_base(base) -> bool:
    return isinstance(base, fp8.Float8Linear) or type(base).__name__ in ("Linear", "Linear4bit")


def _frozen_base(base, x):
    """(weight, weight scale or None, bias) of a frozen linear layer (a LoRA layer's base) where _LoraLinear and
    fp8.frozen_matmul can compute it on `x`: an FP8, 16-bit or bitsandbytes 4-bit layer in x's dtype (one multiplied
    in FP8 with the row scales fuse_lora found), outside autocast (whose casts its backward would not repeat); None
    otherwise."""
    if torch.is_autocast_enabled(x.device.type):
        return None
    if isinstance(base, fp8.Float8Linear):
        return base.weight, base.weight_scale, base.bias
    weight = base.weight
    dtype = weight.quant_state.dtype if hasattr(weight, "quant_state") else weight.dtype
    scale = getattr(base, "fp8_row_scales", None)  # a 4-bit base multiplied in FP8 (fp8.multiply_4bit_in_fp8)
    return (weight, scale, base.bias) if _is_frozen_base(base) and dtype == x.dtype else None


def _fused_lora_forward(self, x, *args, **kwargs):
    """peft's lora.Linear forward as one _LoraLinear where it applies, else with B, its scale and the add in one
    addmm; any case but the plain one is peft's own. A down projection whose GELU moved here applies it first."""
    gelu = getattr(self, "_gelu_input", None)
    name = _plain_adapter(self, x, args, kwargs)
    base = _frozen_base(self.base_layer, x) if name is not None else None
    if base is not None and isinstance(self.lora_dropout[name], torch.nn.Identity):
        up = self.lora_B[name].weight * self.scaling[name]
        return _LoraLinear.apply(x, self.lora_A[name].weight, up, *base, gelu is not None, gelu == "recompute",
                                 getattr(self, "_in_recompute", False))
    if gelu:
        x = _gelu(x)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    down = self.lora_A[name](self.lora_dropout[name](x))
    up = (self.lora_B[name].weight * self.scaling[name]).t().to(result.dtype)
    return torch.addmm(result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]), up).view(result.shape)


class _Siblings:
    """Sibling LoRA layers over FP8 bases computed together, once per input, each taking its slice of the result."""

    def __init__(self, layers: list):
        bases = [layer.base_layer for layer in layers]
        self.layers, self.sizes = layers, [base.out_features for base in bases]
        self.weight = torch.cat([base.weight for base in bases])
        self.scale = torch.cat([base.weight_scale for base in bases])
        self.bias = torch.cat([base.bias for base in bases]) if all(b.bias is not None for b in bases) else None
        start = 0
        for base, size in zip(bases, self.sizes):  # each layer keeps working alone (adapter disabled, merging)
            base.weight = torch.nn.Parameter(self.weight[start : start + size], requires_grad=False)
            base.weight_scale = self.scale[start : start + size]
            if self.bias is not None:
                base.bias = torch.nn.Parameter(self.bias[start : start + size], requires_grad=False)
            start += size
        self.input = self.outputs = None
        self.pending = 0

    def usable(self, x, args, kwargs) -> bool:
        names = {_plain_adapter(layer, x, args, kwargs) for layer in self.layers}
        return not torch.is_autocast_enabled(x.device.type) and None not in names and len(names) == 1 and all(
            isinstance(layer.lora_dropout[next(iter(names))], torch.nn.Identity) for layer in self.layers)

    def output(self, index: int, x):
        if self.input is not x:  # the first sibling called with this input computes for all
            self.input, self.outputs, self.pending = x, self._compute(x), len(self.layers)
        out = self.outputs[index]
        self.pending -= 1
        if not self.pending:  # every sibling has its slice: hold nothing until the next input
            self.input = self.outputs = None
        return out

    def _compute(self, x):
        name = self.layers[0].active_adapters[0]
        down = torch.cat([layer.lora_A[name].weight for layer in self.layers])
        up = torch.block_diag(*(layer.lora_B[name].weight * layer.scaling[name] for layer in self.layers))
        out = _LoraLinear.apply(x, down, up, self.weight, self.scale, self.bias, False, False, False)
        # A slice that attention saves for the backward (v) would keep the whole output alive: the small ones are
        # copied out (k and v are 7% each of StarCoder2-15B's q/k/v width).
        return [part if 4 * size >= out.shape[-1] else part.contiguous()
                for part, size in zip(out.split(self.sizes, -1), self.sizes)]


def _sibling_forward(self, x, *args, **kwargs):
    if self._siblings.usable(x, args, kwargs):
        return self._siblings.output(self._sibling_index, x)
    return _fused_lora_forward(self, x, *args, **kwargs)


def recomputes_gelu(model) -> bool:
    """Whether fuse_lora made an MLP's down projection recompute its GELU's output in the backward."""
    return any(getattr(module, "_gelu_input", None) == "recompute" for module in model.modules())


def _skipping_unread(checkpoint, downs: list):
    """A decoder layer's checkpoint function (transformers' `_gradient_checkpointing_func`) under which the layer's
    recompute, each call of its function after the first, has `downs` (its MLP's down projections, adapted or
    frozen) skip their output. Calls, not autograd's state, tell the two apart: reentrant checkpointing recomputes
    with gradients on too."""
    def checkpoint_skipping_unread(function, *args, **kwargs):
        calls = 0

        def run(*run_args, **run_kwargs):
            nonlocal calls
            calls += 1
            for down in downs:
                down._in_recompute = calls > 1
            try:
                return function(*run_args, **run_kwargs)
            finally:
                for down in downs:
                    down._in_recompute = False

        return checkpoint(run, *args, **kwargs)

    return checkpoint_skipping_unread


def _frozen_down_forward(self, x):
    """A frozen down projection's forward as fp8.frozen_matmul where it can compute it; its own otherwise."""
    base = _frozen_base(self, x)
    if base is None:
        return self._own_forward(x)
    return fp8.frozen_matmul(x, *base, self._in_recompute)


def _down_projection_skipping(module) -> list:
    """Where `module` is an MLP whose down projection follows a tanh GELU (StarCoder's, StarCoder2's), the linear
    layers its layer's recompute skips: an adapted one's base and B (the fused path, the GELU moved into it), or a
    frozen one's self (16-bit, FP8 or 4-bit: StarCoder2's default targets leave it), whose forward becomes
    fp8.frozen_matmul here. None otherwise."""
    activation, down = (getattr(module, name, None) for name in ACTIVATION_THEN_DOWN)
    if getattr(down, "_gelu_input", None):
        return [down.base_layer, *down.lora_B.values()]
    if is_tanh_gelu(activation) and _is_frozen_base(down) and isinstance(down, torch.nn.Linear):
        down._own_forward, down._in_recompute = down.forward, False
        down.forward = types.MethodType(_frozen_down_forward, down)
        return [down]
    return []


def _skip_unread(model) -> None:
    """Each checkpointed decoder layer's MLP down projections after a GELU (the layer's last, read only by the
    residual sum in StarCoder and StarCoder2) skip their output in the layer's recompute; their linear layers marked
    `not_recomputed` for flops_counter. Once per layer, however often fuse_lora runs."""
    for layer in model.modules():
        checkpoint = getattr(layer, "_gradient_checkpointing_func", None)
        if getattr(layer, "_skips_unread", False) or not (isinstance(layer, GradientCheckpointingLayer) and checkpoint):
            continue
        skipped = {module: _down_projection_skipping(module) for module in layer.modules()}
        downs = [getattr(module, ACTIVATION_THEN_DOWN[1]) for module, linears in skipped.items() if linears]
        if downs:
            layer._gradient_checkpointing_func, layer._skips_unread = _skipping_unread(checkpoint, downs), True
        for linear in (linear for linears in skipped.values() for linear in linears):
            linear.not_recomputed = True


def fuse_lora(model, recompute_gelu: bool = False, skip_unread: bool = False) -> int:
    """Give every peft LoRA linear layer of `model` (over a 16-bit, FP8 or bitsandbytes base, a 4-bit one multiplied
    in FP8 after fp8.multiply_4bit_in_fp8) the fused forward (a down projection adapted after a tanh GELU the GELU
    too, its output recomputed in the backward with `recompute_gelu`), and sibling layers over FP8 bases their shared
    forward; returns how many layers were fused. With `skip_unread`, where the layers take the one-function path
    (cli.TrainArguments.takes_fused_path), a checkpointed layer's recompute skips its down projection's output. Call
    it once the model is on its device (a sibling's weight is a view of the shared one) and its checkpointing is
    set."""
    from peft.tuners.lora.layer import LoraLayer

    fused = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and type(module).__name__ in ("Linear", "Linear4bit", "Linear8bitLt"):
            module.forward = types.MethodType(_fused_lora_forward, module)
            fused += 1
    for module in list(model.modules()):
        activation, down = (getattr(module, name, None) for name in ACTIVATION_THEN_DOWN)
        forward = getattr(getattr(down, "forward", None), "__func__", None)  # no down projection: None
        if is_tanh_gelu(activation) and forward is _fused_lora_forward:
            down._gelu_input = "recompute" if recompute_gelu else "keep"  # its forward applies the GELU, on every path
            setattr(module, ACTIVATION_THEN_DOWN[0], torch.nn.Identity())
    for module in list(model.modules()):
        for names in SIBLINGS:
            layers = [getattr(module, name, None) for name in names]
            if all(isinstance(layer, LoraLayer) and isinstance(layer.base_layer, fp8.Float8Linear)
                   for layer in layers) and len({layer.base_layer.in_features for layer in layers}) == 1:
                siblings = _Siblings(layers)
                for index, layer in enumerate(layers):
                    layer._siblings, layer._sibling_index = siblings, index
                    layer.forward = types.MethodType(_sibling_forward, layer)
    if skip_unread:
        _skip_unread(model)
    return fused


def compile_layers(model) -> int:
    """torch.compile each decoder layer in place; returns how many (none without a GPU: compiled CPU code is not
    where this toolkit's speed is, and its compilation takes minutes)."""
    if not torch.cuda.is_available():
        return 0
    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile()
    return len(layers)
