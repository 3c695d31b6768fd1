"""Part 2 — counting achieved TFLOPs: FLOPs per token from the model itself, and a Trainer callback for TFLOPs and MFU.

Depends only on torch and transformers, so it can be copied into any training script.

The tutorial divides the Trainer's `state.total_flos` by the time spent inside training steps. `total_flos` is
`6 x tokens x parameters` (Kaplan et al. 2020, "Scaling Laws", section 2.1): it counts padding tokens, charges frozen
weights a weight gradient they never get, leaves out the tied LM head and attention, and is only updated when the
Trainer logs or saves. We keep that metric for comparison (`achieved_tflops`) and add model FLOPs and MFU
(Chowdhery et al. 2022, "PaLM", appendix B) counted from the layers that actually run.
"""

import os
import re
import time
import warnings
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class FlopsPerToken:
    model: float  # FLOPs of one training step per trained token: what MFU counts
    hardware: float  # model FLOPs plus the forward recomputed under activation checkpointing: what HFU counts
    breakdown: dict[str, float] = field(default_factory=dict)  # model FLOPs per token by component
    # Attention's model and hardware FLOPs per token per unit of `span`, by attention window (None: no window)
    attention_per_span: dict[int | None, tuple[float, float]] = field(default_factory=dict)


def _linear_shape(module) -> tuple[int, int] | None:
    """(in, out) of a linear layer: nn.Linear and its bitsandbytes subclasses (Linear4bit, Linear8bitLt, whose
    packed weight has another shape, hence in_/out_features), LoRA's A and B, and GPT-2's transposed Conv1D."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.nx, module.nf
    return None


def _attention_heads(config) -> tuple[int, int]:
    """(query heads, head dim). Key/value heads (multi-query, grouped-query) change memory and the k/v projections
    (read from the layers), not the attention matmuls: every query head still takes a score with every position it
    sees and a weighted sum of their values."""
    heads = config.num_attention_heads
    return heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def attention_window(module, config) -> int | None:
    """How many positions (itself included) a token of this attention layer sees at most, or None: all before it.
    Per layer where the layer keeps its own (Qwen2's mixed layers), else the model's (StarCoder2, Mistral)."""
    return getattr(module, "sliding_window", getattr(config, "sliding_window", None)) or None


def span(seq_len: int, window: int | None) -> float:
    """Twice the mean number of earlier positions (itself half) a token attends to in a causal sequence: `seq_len`
    without a window (sum(2p + 1 for p < n) = n^2 over the sequence); with one, position p sees min(p, window - 1)
    before it."""
    if window is None or seq_len <= window:
        return float(seq_len)
    return (window**2 + (seq_len - window) * (2 * window - 1)) / seq_len


def flops_per_token(model, seq_len: int, gradient_checkpointing: bool | None = False) -> FlopsPerToken:
    """FLOPs per trained token of one forward and backward pass of `model` on sequences of `seq_len` tokens.

    Convention (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters", section 5.1;
    PaLM appendix B), matrix multiplications only (norms, activations and softmax are a rounding error):
    - forward: 2 FLOPs per multiply-accumulate, so 2 x in x out per token for each linear layer;
    - backward: the input gradient (2 x in x out) for every layer that gradients pass through, i.e. every layer
      after the first trainable parameter; the weight gradient (2 x in x out) only where the weight is trainable.
      A frozen base under LoRA therefore costs 4 FLOPs per weight per token, not 6;
    - attention per layer: Q.K^T and P.V take 4 x seq_len x heads x head_dim per token over all positions; causal
      masking needs only half of them, so the forward counts 2 x seq_len x heads x head_dim and the backward up to
      twice that: one matmul per operand that needs a gradient (dQ, dK, dP, dV). A sliding window (StarCoder2's)
      caps the positions a token sees: seq_len becomes `span(seq_len, window)`. Rotary positions and grouped-query
      key/value heads add no matmul here (their projections are linear layers);
    - activation checkpointing recomputes the forward of every checkpointed decoder layer once more: that is
      hardware FLOPs, not model FLOPs. `gradient_checkpointing`: True, every decoder layer; None, each as it is set
      (its `gradient_checkpointing`, which transformers' gradient_checkpointing_enable sets; finetune may leave
      the last layers out). A linear layer marked `not_recomputed` is not (finetune/fusion.py's down projection,
      whose output its layer's backward never reads).
    Layers are read from the model's module tree (its Linear and Conv1D modules, quantized or not, LoRA adapters
    included), whose registration order follows the forward pass in Hugging Face causal LMs; heads and head size
    come from the config. Embedding lookups cost no FLOPs; a tied LM head is a full matmul and is counted.
    """
    heads, head_dim = _attention_heads(model.config)
    counts = dict.fromkeys(["linear_forward", "linear_input_grad", "linear_weight_grad", "attention_forward",
                            "attention_backward"], 0.0)
    recompute = 0.0  # hardware only
    per_span: dict[int | None, tuple[float, float]] = {}  # attention's model, hardware FLOPs per unit of span

    def linear(module, shape, gradient_flows: bool, checkpointed: bool) -> bool:
        nonlocal recompute
        matmul = 2 * shape[0] * shape[1]
        trainable = module.weight.requires_grad
        counts["linear_forward"] += matmul
        counts["linear_input_grad"] += matmul if gradient_flows else 0
        counts["linear_weight_grad"] += matmul if trainable else 0
        recompute += matmul if checkpointed and not getattr(module, "not_recomputed", False) else 0
        return gradient_flows or trainable

    def walk(module, gradient_flows: bool, checkpointed: bool, block: bool = False) -> bool:
        """Counts `module`; returns whether gradients flow out of it. In a decoder layer's blocks (attention, MLP)
        every projection but the last reads the block's input (q/k/v, gate/up, c_attn, c_fc), so each needs an
        input gradient only if that input carries one; the last reads their combined result."""
        nonlocal recompute
        shape = _linear_shape(module)
        if shape is not None:
            return linear(module, shape, gradient_flows, checkpointed)
        is_layer = isinstance(module, GradientCheckpointingLayer)
        if is_layer:
            checkpointed = module.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
        children = [c for c in module.children() if any(_linear_shape(m) for m in c.modules())]
        if not block or len(children) < 2:
            for child in children:
                gradient_flows = walk(child, gradient_flows, checkpointed, block=is_layer)
            return gradient_flows
        inputs = [walk(child, gradient_flows, checkpointed) for child in children[:-1]]
        if type(module).__name__.endswith("Attention"):
            # Separate q/k/v projections may differ (LoRA on q and v only): Q.K^T needs dQ only if q carries a
            # gradient and dK only if k does; P.V needs dP if either does, dV if v does. Fused qkv: all alike.
            q, k, v = inputs if len(inputs) == 3 else [any(inputs)] * 3
            window = attention_window(module, model.config)
            # Per token per unit of span, one matmul of the two (causal: half of 2 x span x heads x head_dim each)
            matmul = heads * head_dim
            forward, backward = 2 * matmul, matmul * (q + k + (q or k) + v)
            recomputed = forward if checkpointed else 0
            counts["attention_forward"] += forward * span(seq_len, window)
            counts["attention_backward"] += backward * span(seq_len, window)
            recompute += recomputed * span(seq_len, window)
            model_unit, hardware_unit = per_span.get(window, (0.0, 0.0))
            per_span[window] = (model_unit + forward + backward, hardware_unit + forward + backward + recomputed)
        return walk(children[-1], any(inputs), checkpointed)

    # Gradients reach the first layer's input only if the embeddings train, or if a hook makes their output
    # require grad (peft's enable_input_require_grads, used for reentrant activation checkpointing).
    embeddings = model.get_input_embeddings()
    walk(model, any(p.requires_grad for p in embeddings.parameters()) or bool(embeddings._forward_hooks), False)
    model_flops = sum(counts.values())
    return FlopsPerToken(model=model_flops, hardware=model_flops + recompute, breakdown=counts,
                         attention_per_span=per_span)


# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s: bf16 (equal to fp16 on all of these) and FP8 (None where
# the chip has none). Datasheets print the sparse figure; dense is half of it. Each row matches one device name as
# torch.cuda.get_device_name() reports it, by a pattern with word boundaries (an `L4` row must not match an L40, nor
# `A100` an RTX A1000); the example is the name the row is tested with.
PEAK_TFLOPS = [  # (pattern, bf16, fp8, example device name)
    (r"\bH200 NVL\b", 835.5, 1670.5, "NVIDIA H200 NVL"),  # NVIDIA H200 datasheet: NVL BF16 1,671, FP8 3,341 sparse
    (r"\bH200\b(?! NVL)", 989.5, 1979.0, "NVIDIA H200"),  # NVIDIA H200 datasheet: SXM BF16 1,979, FP8 3,958 sparse
    (r"\bH100 NVL\b", 835.5, 1670.5, "NVIDIA H100 NVL"),  # NVIDIA H100 datasheet: NVL BF16 1,671, FP8 3,341 sparse
    (r"\bH100 PCIe\b", 756.5, 1513.0, "NVIDIA H100 PCIe"),  # NVIDIA H100 datasheet: PCIe BF16 1,513, FP8 3,026 sparse
    (r"\bH100\b(?! NVL| PCIe)", 989.5, 1979.0, "NVIDIA H100 80GB HBM3"),  # H100 datasheet: SXM BF16 1,979, FP8 3,958
    (r"\bH800 PCIe\b", 756.5, 1513.0, "NVIDIA H800 PCIe"),  # NVIDIA H800 datasheet: as H100 PCIe
    (r"\bH800\b(?! PCIe)", 989.5, 1979.0, "NVIDIA H800"),  # NVIDIA H800 datasheet: SXM BF16 1,979, FP8 3,958 sparse
    (r"\bH20\b", 148.0, 296.0, "NVIDIA H20"),  # NVIDIA H20 product brief: BF16 148, FP8 296 dense
    (r"\bB200\b", 2250.0, 4500.0, "NVIDIA B200"),  # NVIDIA HGX B200 datasheet: per GPU BF16 4.5 PF, FP8 9 PF sparse
    (r"\bGB200\b", 2500.0, 5000.0, "NVIDIA GB200"),  # NVIDIA GB200 NVL72 datasheet: per GPU BF16 5, FP8 10 PF sparse
    (r"\bA100\b", 312.0, None, "NVIDIA A100-SXM4-80GB"),  # NVIDIA A100 datasheet: BF16 312 dense (SXM and PCIe)
    (r"\bA800\b", 312.0, None, "NVIDIA A800-SXM4-80GB"),  # NVIDIA A800 datasheet: BF16 312 dense
    (r"\bA10\b", 125.0, None, "NVIDIA A10"),  # NVIDIA A10 datasheet: BF16 125 dense
    (r"\bL40S\b", 362.05, 733.0, "NVIDIA L40S"),  # NVIDIA L40S datasheet: BF16 362.05 dense, FP8 1,466 sparse
    (r"\bL40\b", 181.05, 362.0, "NVIDIA L40"),  # NVIDIA L40 datasheet: BF16 362.1, FP8 724 sparse
    (r"\bL4\b", 121.0, 242.5, "NVIDIA L4"),  # NVIDIA L4 datasheet: BF16 242, FP8 485 sparse
    (r"\bRTX A6000\b", 154.8, None, "NVIDIA RTX A6000"),  # NVIDIA RTX A6000 datasheet: tensor 309.7 sparse
    (r"\bRTX 6000 Ada\b", 364.2, 728.5, "NVIDIA RTX 6000 Ada Generation"),  # RTX 6000 Ada datasheet: FP8 1,457 sparse
    (r"\bRTX 4090\b", 165.2, 330.3, "NVIDIA GeForce RTX 4090"),  # Ada whitepaper, appendix: FP32 accumulate, dense
    (r"\bMI300X\b", 1307.4, 2614.9, "AMD Instinct MI300X"),  # AMD Instinct MI300X datasheet: dense BF16, FP8
    (r"\bMI325X\b", 1307.4, 2614.9, "AMD Instinct MI325X"),  # AMD Instinct MI325X datasheet: dense BF16, FP8
]
# Not listed, so no MFU rather than a guess: the A10G (AWS's A10 variant; NVIDIA publishes no datasheet for it).


def peak_tflops(device_name: str, override: float | None = None, fp8: bool = False) -> float | None:
    """Peak dense TFLOP/s of a device, bf16 (or FP8), from `override`, $PEAK_TFLOPS (bf16 only), or the table; None
    if unknown."""
    override = override or (None if fp8 else float(os.environ.get("PEAK_TFLOPS", 0)) or None)
    if override:
        return override
    row = next((row for row in PEAK_TFLOPS if re.search(row[0], device_name)), None)
    return None if row is None else row[2 if fp8 else 1]


# Steps timed alone before the measured window: the first allocates the caching allocator's blocks and compiles
# kernels, the second still grows a few buffers.
WARMUP_STEPS = 2


class TFLOPSCallback(TrainerCallback):
    """Logs, at every logging step and at the end of training (keys gain W&B's `train/` prefix):

    - `achieved_tflops`, `time_in_train_steps`: the tutorial's metric, `total_flos` over the summed step time;
    - `model_tflops` and `mfu`, `hardware_tflops` and `hfu`: `flops_per_token` applied to the tokens processed
      (padding excluded; attention charged by each example's own length, packed examples apart), over the time in
      steps after the first `warmup_steps` (allocator warm-up and compilation are reported alone, as
      `warmup_seconds`). MFU is against the dense bf16 peak, whatever the matmuls ran in (FP8 included);
    - `tokens_per_second`: every non-padding token the model processed, prompt tokens included when the loss is
      on completions only (their FLOPs are spent all the same); `samples_per_second` (examples);
      `peak_memory_gib`; `outside_steps_share`, the share of the measured wall time spent between steps (data
      loading, evaluation, saving); `measured_steps` and `step_time_spread` (the slowest step's time per token over
      the fastest's, minus 1: padded batches of other lengths take other times, and are no less stable for it),
      which say how far the rates can be trusted.
    Step boundaries are CUDA-synchronised, so queued GPU work is charged to the step that queued it. Under several
    processes the per-GPU values are for one GPU and `world_*` are the totals. MFU needs the device's peak:
    from `peak_tflops`, $PEAK_TFLOPS or the table above; on an unknown GPU or the CPU it is left out.

    Add it before the W&B callback (first in `trainer.callback_handler.callbacks`) so the values it adds to the
    logs travel with the loss on the `train/global_step` axis; or pass `logging_callback=wandb.log` as the
    tutorial did.
    """

    def __init__(self, warmup_steps: int = WARMUP_STEPS, peak_tflops: float | None = None, logging_callback=None,
                 clock=time.perf_counter):
        self.warmup_steps = warmup_steps
        self.peak_override = peak_tflops
        self.logging_callback = logging_callback
        self.clock = clock
        self.summary: dict[str, float] = {}

    # -- set-up: FLOPs per token, and a hook that counts the tokens each training forward sees ---------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # A sequence's cost: linear layers per token, plus each attention layer per position by the positions it
        # sees (n^2 over a sequence of n without a window), counted per window: `flops_per_token`'s spans; with
        # each decoder layer's checkpointing as it is set.
        self.flops = flops_per_token(model, 0, gradient_checkpointing=None)
        self.windows = list(self.flops.attention_per_span)
        self.device = next(model.parameters()).device
        # tokens, examples, then per window: the sum over positions p of 2 min(p, window - 1) + 1
        self.counts = torch.zeros(2 + len(self.windows), dtype=torch.float64, device=self.device)
        self.flos_at_start = state.total_flos  # a resumed run's total_flos includes the steps before it
        self.hook = model.register_forward_pre_hook(self._count_tokens, with_kwargs=True)
        self.cuda = self.device.type == "cuda"
        name = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        self.peak = peak_tflops(name, self.peak_override) if self.cuda else None
        if self.cuda and self.peak is None:
            warnings.warn(f"no peak TFLOP/s known for {name!r}: MFU is left out; set PEAK_TFLOPS to add it")
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.step_times: list[float] = []
        self.step_tokens: list[float] = []  # tokens each step processed (counted at its end, already synchronised)
        self.measured_from = None  # counts and clock at the end of warm-up
        self.window_start = self.last_step_end = None

    def _count_tokens(self, module, args, kwargs):
        if not module.training:
            return
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        positions = kwargs.get("position_ids")  # packed examples: restart at 0 at every example
        valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        if positions is None:
            positions = valid.cumsum(dim=1) - 1
        # Tensors only: a .item() here would stall the GPU pipeline on every micro-batch. Positions restart at every
        # packed example, so causal attention is charged per example.
        spans = [((2 * (positions if w is None else positions.clamp(max=w - 1)) + 1) * valid).sum()
                 for w in self.windows]
        self.counts += torch.stack([valid.sum(), ((positions == 0) & valid).sum(), *spans]).to(self.counts)

    # -- timing: synchronised step boundaries -------------------------------------------------------------------
    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return self.clock()

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_start = self._now()
        if len(self.step_times) == self.warmup_steps and self.window_start is None:
            self.window_start = self.step_start

    def on_step_end(self, args, state, control, **kwargs):
        self.last_step_end = self._now()
        self.step_times.append(self.last_step_end - self.step_start)
        self.step_tokens.append(self.counts[0].item() - sum(self.step_tokens))
        if len(self.step_times) == self.warmup_steps:
            self.measured_from = self.counts.clone()

    # -- reporting ----------------------------------------------------------------------------------------------
    def flops_of(self, tokens: float, spans: list[float]) -> tuple[float, float]:
        """Model and hardware FLOPs of `tokens` whose positions summed to `spans` (one per window)."""
        per_span = [self.flops.attention_per_span[window] for window in self.windows]
        return (self.flops.model * tokens + sum(s * unit[0] for s, unit in zip(spans, per_span)),
                self.flops.hardware * tokens + sum(s * unit[1] for s, unit in zip(spans, per_span)))

    def metrics(self, state) -> dict[str, float]:
        in_steps = sum(self.step_times)
        values = {"time_in_train_steps": in_steps,
                  "achieved_tflops": (state.total_flos - self.flos_at_start) / in_steps / 1e12 if in_steps else 0.0,
                  "warmup_seconds": sum(self.step_times[: self.warmup_steps])}
        measured = self.step_times[self.warmup_steps :]
        if not measured:
            return values
        tokens_in = self.step_tokens[self.warmup_steps :]
        per_token = [seconds / max(tokens, 1) for seconds, tokens in zip(measured, tokens_in)]
        values.update(measured_steps=len(measured), step_time_spread=max(per_token) / min(per_token) - 1)
        seconds = sum(measured)
        tokens, sequences, *spans = (self.counts - (self.measured_from if self.warmup_steps else 0)).tolist()
        model_flops, hardware_flops = self.flops_of(tokens, spans)
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            totals = torch.tensor([tokens, sequences, model_flops, hardware_flops], device=self.device)
            torch.distributed.all_reduce(totals)
            slowest = torch.tensor([seconds], device=self.device)
            torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
            tokens, sequences, model_flops, hardware_flops = (totals / world).tolist()  # per-GPU means
            seconds = slowest.item()
        values.update(
            model_tflops=model_flops / seconds / 1e12,
            hardware_tflops=hardware_flops / seconds / 1e12,
            tokens_per_second=tokens / seconds,
            samples_per_second=sequences / seconds,
            outside_steps_share=1 - seconds / (self.last_step_end - self.window_start),
        )
        if world > 1:
            values.update(world_model_tflops=values["model_tflops"] * world,
                          world_tokens_per_second=values["tokens_per_second"] * world)
        if self.peak:
            values.update(mfu=values["model_tflops"] / self.peak, hfu=values["hardware_tflops"] / self.peak)
        if self.cuda:
            values["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return values

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not ({"loss", "train_loss"} & logs.keys()):
            return  # evaluation rows carry no training throughput
        self.summary = self.metrics(state)
        logs.update(self.summary)
        if state.log_history:
            state.log_history[-1].update(self.summary)
        if self.logging_callback is not None and state.is_world_process_zero:
            self.logging_callback({f"train/{key}": value for key, value in self.summary.items()})

    def on_train_end(self, args, state, control, **kwargs):
        self.hook.remove()
