"""Model: the tokenizer, the two configurations of Part 1 (quantization and LoRA), the quantized base on the right
device, and the adapter on top."""

import os
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.pytorch_utils import Conv1D

from . import architecture, embedded, files, fp8
from .errors import UsageError, first_line

ALL_LINEAR = "all-linear"  # peft's name for every linear layer but the output head
# What from_pretrained raises for a path that is not a model, a missing or gated Hub id, or a damaged file.
LOAD_ERRORS = (OSError, ValueError, SafetensorError)


def resolve(model: str) -> str:
    return str(embedded.tiny_model_path(model)) if model in embedded.TINY_MODELS else model


def _not_loadable(model: str, error: Exception) -> UsageError:
    cause = first_line(error)[:300].rstrip(".")
    return UsageError(f"could not load model {model!r}: {cause}. Check the hub id or path; for a gated model "
                      f"(bigcode/starcoder is one) accept its licence and set HF_TOKEN; offline, use a local path or "
                      f"`tiny-starcoder`.")


def load_tokenizer(model: str, token: str | None = None):
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve(model), token=token)
    except LOAD_ERRORS as error:
        raise _not_loadable(model, error) from None
    if tokenizer.pad_token is None:  # StarCoder has none; labels mask padding, so reusing EOS is safe
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def check_model(model: str, seq_length: int, token: str | None = None):
    """Before anything loads, from its config (returned): the model is a causal (decoder) language model, and
    `seq_length` fits its learned positions (a longer sequence would index past its position table)."""
    looks_local = model.startswith(("/", ".", "~")) or model.count("/") > 1  # a Hub id is `namespace/name`
    if looks_local and not os.path.exists(model):
        raise UsageError(f"could not load model {model!r}: the path does not exist")
    if os.path.isfile(model):
        raise UsageError(f"--model {model!r} is a file; give the model's directory (its config.json and weights) "
                         f"or a Hub id")
    try:
        config = AutoConfig.from_pretrained(resolve(model), token=token)
        shapes = {}
        for weights in Path(resolve(model)).glob("*.safetensors"):  # a damaged local file fails here, not mid-load
            with safe_open(weights, "pt") as f:  # reads and checks the header and the file's length, not the weights
                shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    except LOAD_ERRORS as error:
        raise _not_loadable(model, error) from None
    architectures = config.architectures or []
    if architectures and not any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        raise UsageError(f"model {model!r} is a {', '.join(architectures)}, not a causal language model; LoRA "
                         f"fine-tuning here needs one (StarCoder's is GPTBigCodeForCausalLM)")
    if os.path.isdir(resolve(model)):
        _check_weights(model, config, shapes)
    limit = position_limit(config)
    if limit and seq_length > limit:
        raise UsageError(f"--seq_length {seq_length} is above {model!r}'s maximum of {limit} positions")
    return config


def _check_weights(model: str, config, shapes: dict) -> None:
    """A local model directory holds weights, and their shapes are the ones its config describes (a config edited
    after the weights were written would load into a model of another shape, or fail deep in loading)."""
    directory = Path(resolve(model))
    if not shapes and not any(directory.glob("*.bin")) and not any(directory.glob("*.index.json")):
        raise UsageError(f"model directory {model!r} holds a config.json but no weights (*.safetensors or "
                         f"pytorch_model*.bin); copy the model's weight files into it")
    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in AutoModelForCausalLM.from_config(config).state_dict().items()}
    for name, shape in shapes.items():
        wanted = expected.get(name) or expected.get(name.removeprefix("model.")) or expected.get(f"model.{name}")
        if wanted is not None and wanted != shape:
            raise UsageError(f"model directory {model!r}: weight {name} has shape {list(shape)} where its "
                             f"config.json describes {list(wanted)}; the config and the weights are of different "
                             f"models")


def position_limit(config) -> int | None:
    """How many positions a model has (None if it does not say): learned positions cannot go further."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def compute_dtype(requested: str = "auto") -> torch.dtype:
    """The requested dtype, or: bf16 where the GPU has it (Ampere and newer), fp16 on older GPUs, fp32 on the CPU
    (whose bf16 matmuls are slow)."""
    if requested != "auto":
        return getattr(torch, requested)
    if not torch.cuda.is_available():
        return torch.float32
    device()  # asks the current device, which must be this rank's
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast_dtype(dtype: torch.dtype, mixed_precision: bool) -> torch.dtype | None:
    """What the Trainer autocasts a model computing in `dtype` to: fp16 always (it needs autocast and the loss
    scaler), bf16 with --mixed_precision (without, a bf16 model simply computes in bf16); None otherwise."""
    return dtype if dtype == torch.float16 or (dtype == torch.bfloat16 and mixed_precision) else None


def check_fp8(setting: str, way_out: str) -> None:
    """Refuse FP8 matmuls where this machine or launch cannot run them, before anything loads. `setting`: what asked
    for them, as the refusal names it; `way_out`: how to turn them off (cli.TrainArguments.named and ways_to: which
    recipe set it, and whether to leave a flag out or set one)."""
    if fp8.unsupported_reason():
        raise UsageError(f"{setting} needs FP8 tensor cores: {fp8.unsupported_reason()}; {way_out}")
    if fsdp_enabled():  # FSDP flattens a module's parameters into one tensor
        raise UsageError(f"{setting} does not run under FSDP: run it under DDP (torchrun), or {way_out}")


def check_quantization(kind: str) -> None:
    """Refuse a --quantization whose library cannot run here, before anything loads (FP8's hardware: check_fp8)."""
    if kind in ("4bit", "8bit"):
        try:
            import bitsandbytes  # noqa: F401  (transformers would fail later, deep inside from_pretrained)
        except ImportError as error:
            raise UsageError(f"--quantization {kind} needs bitsandbytes, which cannot run here ({error}); install "
                             f"it, or use --quantization none") from None


def quantization_config(kind: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """How the frozen base is stored. `4bit`: QLoRA (Dettmers et al. 2023), NF4 storage with double quantization (its
    block scales quantized again, ~0.4 bits a weight saved), matmuls in `compute_dtype` (base_example.py shows it
    written out). `8bit`: LLM.int8 (Dettmers et al. 2022), the tutorial's. `fp8` and `none` load a 16-bit base: fp8
    converts it after LoRA is added (finetune/fp8.py). Whether this machine can run it is check_quantization's and
    check_fp8's question, asked where the run's settings are known (pipeline.prepare names the recipe that set them)."""
    if kind in ("fp8", "none"):
        return None
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def target_names(targets: str) -> list[str] | None:
    """--lora_target_modules as a list of layer names, or None for the architecture's defaults (filled in by the
    pipeline once it knows the model)."""
    return [name.strip() for name in targets.split(",") if name.strip()] or None


def lora_config(r: int, alpha: int, dropout: float, targets: str) -> LoraConfig:
    """LoRA (Hu et al. 2021): each adapted layer W gains (alpha / r) B A, A of shape r x in (random), B of shape
    out x r (zeros, so training starts from the base model); only A and B train, no bias."""
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_names(targets), bias="none",
                      task_type="CAUSAL_LM")


def fsdp_enabled() -> bool:
    """Launched with `accelerate launch --config_file accelerate/fsdp_qlora.yaml`."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def device() -> torch.device:
    """This process's device, made the current CUDA device: under torchrun each rank takes its LOCAL_RANK's GPU.
    Never device_map="auto" with several processes: it would spread one model over all GPUs and leave the other
    ranks' copies nowhere. Until it is set, the current device is GPU 0 in every process: each rank's first CUDA
    call would open a context there, and under FSDP (no device_map) bitsandbytes would quantize every rank's
    copy onto it."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    gpu = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(gpu)
    return gpu


def load_model(model: str | None, quantization: BitsAndBytesConfig | None, dtype: torch.dtype,
               model_class=AutoModelForCausalLM, on_cpu: bool = False, **from_pretrained_kwargs):
    """The base model, quantized as `quantization` says, on this process's device (`on_cpu`: on the CPU, for the
    caller to move), in `dtype`, for training (no key/value cache). The benches build a model from in-memory weights
    through the same path: `model=None`, the architecture's class, and `config=` and `state_dict=`."""
    placement = torch.device("cpu") if on_cpu else device()
    if fsdp_enabled() and quantization is not None and quantization.load_in_4bit:
        # FSDP flattens each wrapped module's parameters into one tensor of one dtype: the packed 4-bit weights are
        # stored as the compute dtype (peft's FSDP-QLoRA guide)
        quantization.bnb_4bit_quant_storage = dtype
    try:
        loaded = model_class.from_pretrained(
            resolve(model) if model else None, dtype=dtype,
            device_map=None if fsdp_enabled() else {"": placement},  # FSDP places the shards itself
            quantization_config=quantization, **from_pretrained_kwargs)
    except LOAD_ERRORS as error:
        raise _not_loadable(model, error) from None
    # A training forward needs no cache, and with one transformers would not see packed examples' boundaries.
    loaded.config.use_cache = False
    for module in loaded.modules():
        # bitsandbytes 0.50 repacks a CPU Linear4bit's weight for AVX512-BF16 at its first inference forward, and
        # a training forward after that (training resumed after an evaluation) fails in an in-place bias add.
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return loaded


def load_quantized(model: str, kind: str):
    """A base model with `kind`'s quantization (4bit, 8bit or none) in the compute dtype: how generate.py loads it."""
    check_quantization(kind)
    dtype = compute_dtype()
    return load_model(model, quantization_config(kind, dtype), dtype)


def linear_layer_names(config) -> tuple[list[str], str]:
    """Distinct names (last path component) of the linear layers of a model with this config, GPT-2's Conv1D
    included: the names LoRA can target; and the output head's. Read from a skeleton on the meta device, so nothing
    is loaded."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    head = next(name for name, module in skeleton.named_modules() if module is skeleton.get_output_embeddings())
    return sorted({name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D))}), head.rsplit(".", 1)[-1]


def lora_targets(config, requested) -> list[str]:
    """The layer names to adapt: those asked for (each must exist; `all-linear` is every linear layer but the output
    head), or by default the architecture's (finetune/architecture.py; else peft's own default for it)."""
    available, head = linear_layer_names(config)
    if set(requested or ()) == {ALL_LINEAR}:
        return [name for name in available if name != head]
    if requested:
        unknown = sorted(set(requested) - set(available))
        if unknown:
            raise UsageError(f"LoRA targets {unknown} match no layer of this model; its linear layers are "
                             f"{available} (pass them with --lora_target_modules)")
        return sorted(requested)
    targets = architecture.lora_targets(config.model_type) or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(
        config.model_type, [])
    if not set(targets) & set(available):
        raise UsageError(f"no default LoRA targets for {config.model_type!r}; its linear layers are {available} "
                         f"(pass them with --lora_target_modules)")
    return [name for name in targets if name in available]


def check_rank(config, targets, rank: int) -> None:
    """A LoRA rank no larger than the smallest layer it adapts: B A cannot have a higher rank than its layer."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    smallest = min(min(module.weight.shape) for name, module in skeleton.named_modules()
                   if name.rsplit(".", 1)[-1] in targets and isinstance(module, (torch.nn.Linear, Conv1D)))
    if rank > smallest:
        raise UsageError(f"--lora_r {rank} is above the rank of the smallest layer it adapts ({smallest}); LoRA's "
                         f"update cannot have a higher rank than its layer: lower --lora_r")


def add_lora(model, config: LoraConfig, fp32_upcast: bool = False, gradient_checkpointing: bool = False,
             fp32_adapter: bool = False):
    """Freeze the base and wrap it with a trainable LoRA adapter.

    `fp32_upcast`: peft's prepare_model_for_kbit_training, which keeps fp32 copies of every non-quantized weight
    (norms, embeddings, the tied LM head); each forward then casts them back to 16 bits. `fp32_adapter`: LoRA
    weights in fp32 (peft's default) rather than the model's dtype; fp16 needs them, for its loss scaler.
    """
    if getattr(model, "hf_quantizer", None) is not None and fp32_upcast:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        # non-reentrant (transformers' default): frozen inputs are fine. Renamed in transformers 5.2x.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    return get_peft_model(model, config, autocast_adapter_dtype=fp32_adapter or model.dtype == torch.float16)


def decoder_layers(model) -> list:
    """The decoder layers, in order: the units activation checkpointing recomputes."""
    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def checkpoint_only_first(model, layers: int) -> None:
    """Leave activation checkpointing on in the first `layers` decoder layers only: the others keep their activations
    and skip the recompute. The last ones, as Megatron-LM's `--recompute-method block`: their backward runs first
    and frees what they kept before the first recompute."""
    for layer in decoder_layers(model)[layers:]:
        layer.gradient_checkpointing = False


def load_adapter(base, adapter: str, base_name: str):
    """A trained adapter on `base` (peft's PeftModel); one whose shapes or layer names do not fit is refused. Names
    that fit in part (an adapter of StarCoder's c_attn and c_proj on StarCoder2, whose MLP has a c_proj) peft loads
    with a warning, leaving the layers it misses at their start, B = 0: the base alone, shown as base + adapter."""
    does_not_fit = f"the adapter in {adapter!r} was trained on {adapter_base(adapter)!r} and does not fit {base_name!r}"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Found missing adapter keys")  # refused below, in one line
            model = PeftModel.from_pretrained(base, adapter)
    except (RuntimeError, ValueError, KeyError, OSError) as error:
        raise UsageError(f"{does_not_fit}: {first_line(error)[:200]}") from None
    # LoRA's weights by the names peft saves (without the adapter's name); other saved weights (embeddings) aside
    with safe_open(Path(adapter) / "adapter_model.safetensors", "pt") as weights:
        saved = {name for name in weights.keys() if "lora_" in name}
    wanted = {name for name in get_peft_model_state_dict(model, save_embedding_layers=False) if "lora_" in name}
    way_out = ("leave out --model to load its own base" if base_name != adapter_base(adapter) else
               "its weights file is incomplete: restore it, or retrain")
    for names, what in ((saved - wanted, "of its weights have no layer there"),
                        (wanted - saved, "of the layers it adapts there have no weights in it")):
        if names:
            raise UsageError(f"{does_not_fit}: {len(names)} {what} ({sorted(names)[0]}, ...); {way_out}")
    return model


def adapter_config(adapter: str) -> dict:
    path = Path(adapter) / "adapter_config.json"
    if not (path.exists() or path.is_symlink()):
        raise UsageError(f"{adapter!r} holds no adapter (adapter_config.json); point --adapter at a training output "
                         f"directory")
    return files.read_json(path, "the adapter's configuration", "retrain, or restore it")


def adapter_base(adapter: str) -> str:
    """The base model an adapter directory was trained on, from its adapter_config.json."""
    base = adapter_config(adapter).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise UsageError(f"{Path(adapter) / 'adapter_config.json'} names no base model; give one with --model")
    return base


def check_adapter(adapter: str) -> None:
    """An adapter directory whose files can be loaded, checked before the base loads: its config, and its weights'
    header and length (a truncated or damaged file is named here, not deep inside peft)."""
    adapter_config(adapter)
    weights = Path(adapter) / "adapter_model.safetensors"
    files.refuse_link(weights, "the adapter's weights")
    if not weights.is_file():
        raise UsageError(f"{adapter!r} holds no adapter weights (adapter_model.safetensors); point --adapter at a "
                         f"finished training run's output directory")
    try:
        with safe_open(weights, "pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise UsageError(f"{weights} is damaged ({first_line(error)[:120]}): copy it again from its run, whose "
                         f"checkpoints hold it too") from None
