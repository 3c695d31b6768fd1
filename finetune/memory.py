"""Will it fit? The GPU memory a training run needs, estimated from the model's config before any weight loads, so a
run that cannot fit says what to change instead of failing with an out-of-memory error after minutes of loading.

The estimate (GiB, and what is in it):
- frozen weights: linear layers at their storage size (NF4 with double quantization 0.52 bytes a weight: 4 bits and
  its block scales; LLM.int8 and FP8 1; a 16-bit base 2), everything else (embeddings, norms, biases, and the output
  head, which bitsandbytes leaves unquantized) in the compute dtype, or fp32 with --fp32_upcast. An FP8 base loads
  on the CPU and reaches the GPU a layer at a time, so its loading never holds more than the step does;
- LoRA: weights, gradients and AdamW's two fp32 moments;
- activations kept for the backward, per token and layer: about 6 x hidden values of 2 bytes (layer-norm inputs
  and outputs, q/k/v, the attention output), the MLP's pre-activation (gate and up with a gated MLP), and its
  post-activation too where LoRA adapts the down projection, which needs its input, unless the fused path recomputes
  that input (a tanh GELU's output, finetune/fusion.py). Calibrated on StarCoder-15B, LoRA on c_attn and c_proj,
  and StarCoder2-15B, on q/k/v/o, at 4 x 2048 tokens on an H200 (docs/PERFORMANCE.md);
  with activation checkpointing a checkpointed layer keeps only its input (in CPU memory with
  --offload_layer_inputs), and rebuilds the rest in the backward,
  one layer at a time, after the layers that kept theirs (the last ones) have freed them; with --fp32_upcast they
  are fp32. Each adapted layer's input also keeps, for LoRA's backward, autocast's 16-bit copy of it where it is fp32
  (--fp32_upcast under autocast) and LoRA dropout's mask: measured, the qlora and tutorial recipes peaked 1.6 and
  1.9 GiB above an estimate without them (StarCoder-15B, H100, 2026-12-07, docs/PERFORMANCE.md);
- the loss: the chunked head's logits for CHUNK_TOKENS tokens at a time (bf16 logits, their fp32 copy and gradient), or
  every token's without it (FSDP);
- with --fp8_matmuls, the largest weight in e4m3 and its transpose, made as a layer multiplies;
- the backward's largest activation gradients, and 1.5 GiB for the CUDA context and the allocator's slack.
"""

import math
from dataclasses import dataclass, replace

import torch
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from . import fusion
from .chunked_loss import CHUNK_TOKENS
from .errors import UsageError

GIB = 2**30
WEIGHT_BYTES = {"4bit": 0.52, "8bit": 1.0, "fp8": 1.0, "none": 2.0}
HIDDEN_VALUES = 6.0  # activation values kept per token and layer, in hiddens (besides the MLP's)
OVERHEAD_GIB = 1.5
# --checkpointed_layers fit plans to the card's memory less this: a desktop's display or another process may hold
# some of it, which the card's size does not tell. Without it fp8_lean peaked at 22.4 GiB under a 24 GiB cap, over
# issue 21's 22 GiB line for a 24 GB card (H200, 2026-12-06, bench/recipes.py --memory_cap_gib 24;
# docs/PERFORMANCE.md).
FIT_MARGIN_GIB = 1.0


@dataclass(frozen=True)
class Shape:
    """What the estimate reads off a model's config (through a skeleton on the meta device: nothing loads)."""
    linear: int  # weights of the linear layers bitsandbytes and FP8 quantize
    largest: int  # of those, the largest layer's
    head: int  # weights of the output head
    tied: bool  # the head is the input embedding's weight
    other: int  # every other parameter: embeddings, norms, biases
    lora: int  # LoRA weights at the run's rank and targets
    adapted_inputs: int  # input values per token and layer of the layers LoRA adapts
    layers: int
    hidden: int
    mlp: int  # the MLP's inner width, doubled for a gated MLP (gate and up projections)
    mlp_kept: int  # the MLP activation values kept per token: its pre-activations, and the post-activation if adapted
    mlp_recomputable: int  # of those, what the fused path can recompute instead (cli.TrainArguments.takes_fused_path)
    vocab: int


def shape_of(config, lora_r: int, lora_targets: list[str]) -> Shape:
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    head = skeleton.get_output_embeddings()
    tied = head.weight is skeleton.get_input_embeddings().weight
    linear = lora = largest = adapted_inputs = 0
    names = {module: name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules()}
    for module in skeleton.modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head:
            linear += module.weight.numel()
            largest = max(largest, module.weight.numel())
            if names[module] in lora_targets:
                lora += lora_r * sum(module.weight.shape)
                adapted_inputs += module.in_features if isinstance(module, torch.nn.Linear) else module.nx
    total = sum(p.numel() for p in skeleton.parameters())
    mlp = next(module for name, module in skeleton.named_modules() if name.endswith(".mlp"))
    projections = [names[m] for m in mlp.modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size
    widened = inner * (len(projections) - 1)  # c_fc; or gate and up
    post = inner * (projections[-1] in lora_targets)
    activation, down = (getattr(mlp, name, None) for name in fusion.ACTIVATION_THEN_DOWN)
    recomputable = post if fusion.is_tanh_gelu(activation) and names.get(down) in lora_targets else 0
    return Shape(linear=linear, largest=largest, head=head.weight.numel(), tied=tied,
                 other=total - linear - (0 if tied else head.weight.numel()), lora=lora,
                 adapted_inputs=adapted_inputs // config.num_hidden_layers,
                 layers=config.num_hidden_layers, hidden=config.hidden_size, mlp=widened, mlp_kept=widened + post,
                 mlp_recomputable=recomputable, vocab=config.vocab_size)


def estimate(shape: Shape, quantization: str, batch_size: int, seq_length: int, checkpointed_layers: int,
             fp32_upcast: bool = False, chunked_loss: bool = True, recompute_gelu: bool = False,
             offloaded_layers: int = 0, offloaded_inputs: bool = False, fp8_matmuls: bool = False,
             lora_input_bytes: int = 0) -> dict[str, float]:
    """GiB by component, and `total`: the peak of a training step with `checkpointed_layers` decoder layers
    checkpointed, of which `offloaded_layers` keep their activations in CPU memory instead (finetune/offload.py),
    and the rest, with `offloaded_inputs`, their inputs; the other layers keep theirs (`recompute_gelu`:
    fusion.fuse_lora's; `fp8_matmuls`: fp8.multiply_4bit_in_fp8's; `lora_input_bytes`: the bytes LoRA keeps of each
    adapted input value, as settings() counts them)."""
    compute = 4 if fp32_upcast else 2
    # bitsandbytes leaves the head 16-bit (a tied one is the embedding); FP8 converts it, a tied one into a copy
    head_bytes = 1 if quantization == "fp8" else 0 if shape.tied else 2
    weights = shape.linear * WEIGHT_BYTES[quantization] + shape.head * head_bytes + shape.other * compute
    tokens = batch_size * seq_length
    # bytes per token; with fp32 norms (--fp32_upcast) the residual stream and what it feeds are fp32
    kept = shape.mlp_kept - (shape.mlp_recomputable if recompute_gelu else 0)
    per_layer = compute * (HIDDEN_VALUES * shape.hidden + kept) + lora_input_bytes * shape.adapted_inputs
    # at the forward's end, the layers that kept theirs; later, once they are freed, one checkpointed layer rebuilt
    # or offloaded layer fetched back, and with offloading the next one's activations fetched ahead of it
    recomputed = checkpointed_layers - offloaded_layers
    # inputs in CPU memory: on the GPU only the one a recompute reads and the one fetched ahead of it
    inputs_kept = min(recomputed, 2) if offloaded_inputs else recomputed
    kept_or_rebuilt = max(shape.layers - checkpointed_layers, 1 if checkpointed_layers else 0) + (offloaded_layers > 0)
    activations = tokens * (inputs_kept * compute * shape.hidden + kept_or_rebuilt * per_layer)
    loss_tokens = min(tokens, CHUNK_TOKENS) if chunked_loss else tokens
    parts = {"weights": weights, "lora": shape.lora * (2 + 2 + 8), "activations": activations,
             "loss": loss_tokens * shape.vocab * (2 + 4 + 4), "backward": 2 * tokens * shape.mlp * 2,
             "fp8_weights": 2 * shape.largest * fp8_matmuls}
    parts = {name: value / GIB for name, value in parts.items()}
    return {**parts, "total": sum(parts.values()) + OVERHEAD_GIB}


def settings(args, checkpointed_layers: int, recompute_gelu: bool) -> dict:
    """estimate()'s settings for a run of `args` with the first `checkpointed_layers` layers checkpointed."""
    from .modeling import autocast_dtype, compute_dtype

    autocast = autocast_dtype(compute_dtype(args.dtype), args.mixed_precision) is not None
    return dict(quantization=args.quantization, batch_size=args.batch_size, seq_length=args.seq_length,
                checkpointed_layers=checkpointed_layers,
                offloaded_layers=min(args.offloaded_layers, checkpointed_layers),
                offloaded_inputs=args.offload_layer_inputs, fp32_upcast=args.fp32_upcast,
                recompute_gelu=recompute_gelu, fp8_matmuls=args.fp8_matmuls,
                # what LoRA keeps of each adapted input value for its backward, besides the activations: autocast's
                # 16-bit copy of an fp32 input (--fp32_upcast), and LoRA dropout's mask
                lora_input_bytes=2 * (autocast and args.fp32_upcast) + (args.lora_dropout > 0))


def device_gib() -> float | None:
    """This process's GPU's memory, under the cap a memory budget set; None without a GPU."""
    if not torch.cuda.is_available():
        return None
    from .modeling import device

    gpu = device()
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda gpu: 1.0)(gpu)  # torch 2.8 and newer
    return torch.cuda.get_device_properties(gpu).total_memory / GIB * fraction


def requested_checkpointed_layers(args, layers: int) -> int | None:
    """How many decoder layers (the first ones) --gradient_checkpointing and --checkpointed_layers ask to checkpoint
    in a model of `layers`; None for `fit`, which plan() decides."""
    if not args.gradient_checkpointing:
        return 0
    if args.checkpointed_layers == "fit":
        return None
    if args.checkpointed_layers == "all":
        return layers
    count = int(args.checkpointed_layers)
    if count > layers:
        raise UsageError(f"--checkpointed_layers {count} is more than the model's {layers} decoder layers; give "
                         f"{layers} or fewer, or all")
    return count


def plan(args, config, lora_targets: list[str], chunked_loss: bool = True) -> tuple[int, bool]:
    """(checkpointed layers, recompute the GELU): how the run keeps its activations within the GPU's memory.

    With --checkpointed_layers fit, the fewest checkpointed layers whose estimate fits the card less FIT_MARGIN_GIB:
    each one left out skips its forward's recompute (StarCoder-15B on an H200, 2026-12-06: fp8_lean 9,475 tokens/s
    with all 40 checkpointed, 9,882 with 31; lean 5,333 and 5,803 with 21; docs/PERFORMANCE.md); and the GELU
    recomputed (fusion.fuse_lora) where that leaves out more of them: its second pass costs 1.1% of a step (H100,
    2026-12-06, docs/PERFORMANCE.md). Otherwise the layers asked for, and the GELU recomputed only where the run would
    not fit without it: on an 80 GB card it fits a bf16 base at 4 x 2,048 and FP8 at 6 x 2,048 for StarCoder-15B. On
    the CPU: the layers asked for (fit: all), the GELU kept."""
    layers = config.num_hidden_layers
    requested = requested_checkpointed_layers(args, layers)
    available = device_gib()
    if available is None:
        return (layers if requested is None else requested), False
    shape = shape_of(config, args.lora_r, lora_targets)
    can_recompute = args.takes_fused_path

    def fits(checkpointed: int, recompute_gelu: bool, budget: float = available) -> bool:
        needed = estimate(shape, **settings(args, checkpointed, recompute_gelu), chunked_loss=chunked_loss)
        return needed["total"] <= budget

    if requested is None:
        budget = available - FIT_MARGIN_GIB
        keeping, recomputing = (next((n for n in range(shape.layers + 1) if fits(n, recompute, budget)), math.inf)
                                for recompute in (False, can_recompute))
        if recomputing < keeping:
            return recomputing, True
        requested = min(keeping, shape.layers)  # where nothing fits: all, which the memory check has weighed
    return requested, can_recompute and not fits(requested, False)


def check(args, config, lora_targets: list[str], chunked_loss: bool = True) -> dict | None:
    """Refuse, before anything loads, a run whose estimate exceeds the GPU's memory, naming the changes that would
    fit as the user makes them (args.ways_to). Returns the estimate (None on the CPU, or with --check_memory
    false)."""
    requested_checkpointed_layers(args, config.num_hidden_layers)  # refuses more layers than the model has, also here
    available = device_gib()
    if available is None or not args.check_memory:
        return None
    shape = shape_of(config, args.lora_r, lora_targets)

    def planned(run) -> dict:  # with --checkpointed_layers fit: all of them, the most it can come to
        requested = requested_checkpointed_layers(run, shape.layers)
        return settings(run, shape.layers if requested is None else requested, run.takes_fused_path)

    asked = planned(args)
    needed = estimate(shape, **asked, chunked_loss=chunked_loss)
    if needed["total"] <= available:
        return needed

    def fitting(*changes: dict) -> list[str]:
        found = []
        for change in changes:
            try:
                changed = replace(args, **change)
            except UsageError:  # the arguments' own rules refuse it: --offload_layer_inputs with --compile_layers
                continue
            trial = planned(changed)
            total = estimate(shape, **trial, chunked_loss=chunked_loss)["total"]
            if trial != asked and total <= available:
                found.append(f"{args.ways_to(**change)} (about {math.ceil(total)} GiB)")
        return found

    every = dict(gradient_checkpointing=True, checkpointed_layers="all")
    offload = [dict(offload_layer_inputs=True)] if asked["checkpointed_layers"] else []
    smaller = sorted({args.batch_size // 2, 1} - {0, args.batch_size}, reverse=True)
    found = fitting(every, *offload, *(dict(batch_size=b) for b in smaller), dict(quantization="4bit")) or \
        fitting({**every, "quantization": "4bit"}, {**every, "batch_size": 1})
    advice = f"; this would fit: {' or '.join(found)}" if found else "; nothing simple fits: use a smaller model"
    checkpointed = asked["checkpointed_layers"]
    state = ("off" if not checkpointed else "on" if checkpointed == shape.layers
             else f"on in {checkpointed} of {shape.layers} layers")
    raise UsageError(f"this run needs about {needed['total']:.0f} GiB of GPU memory ({args.batch_size} x "
                     f"{args.seq_length} tokens, {args.quantization} base, activation checkpointing {state}) and "
                     f"the GPU has {available:.0f} GiB"
                     f"{advice}; --check_memory false tries anyway")
