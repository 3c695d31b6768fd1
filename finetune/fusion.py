"""Speed-ups that do in fewer kernels what the model does in several, each giving the same sums (tested against the
unfused path on the CPU); measured in docs/PERFORMANCE.md.

- `fuse_lora`: peft computes a LoRA layer as base(x) + B(A(x)) * scale: the B matmul, the scaling and the add are
  three kernels, two of them full passes over the layer's output. Here B, its scale and the add are one GEMM
  (`torch.addmm`, whose epilogue adds the base output), the scale folded into B's small (out x r) weight.
- `compile_layers`: each decoder layer compiled with torch.compile (regional compilation: one layer's code, reused
  by the others), so the elementwise work around the GEMMs (layer norms, GELU, the FP8 layers' activation
  quantization, LoRA's adds) fuses into fewer kernels. GPUs only; the first steps pay the compilation.
"""

import types

import torch
from transformers.modeling_layers import GradientCheckpointingLayer


def _fused_lora_forward(self, x, *args, **kwargs):
    """peft's lora.Linear forward with B, its scale and the add in one addmm; any case but the plain one (adapter
    disabled or merged, several adapters, DoRA and other variants, a dtype cast, extra arguments) is peft's own."""
    names = self.active_adapters
    name = names[0] if len(names) == 1 else None
    plain = (name in self.lora_A and name not in self.lora_variant and not (args or kwargs) and not self.merged
             and not self.disable_adapters and self.lora_B[name].bias is None)
    if not plain or self.lora_A[name].weight.dtype != x.dtype:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    down = self.lora_A[name](self.lora_dropout[name](x))
    up = (self.lora_B[name].weight * self.scaling[name]).t().to(result.dtype)
    return torch.addmm(result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]), up).view(result.shape)


def fuse_lora(model) -> int:
    """Give every peft LoRA linear layer of `model` (over a 16-bit, FP8 or bitsandbytes base) the fused forward;
    returns how many."""
    from peft.tuners.lora.layer import LoraLayer

    fused = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and type(module).__name__ in ("Linear", "Linear4bit", "Linear8bitLt"):
            module.forward = types.MethodType(_fused_lora_forward, module)
            fused += 1
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
