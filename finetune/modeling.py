"""Model: the tokenizer, the quantized base on the right device, and the LoRA adapter on top."""

import os

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.pytorch_utils import Conv1D

from . import embedded
from .cli import UsageError

# The tutorial's `q_attn` exists only for GPTBigCode cross-attention, so it matches nothing in StarCoder.
DEFAULT_LORA_TARGETS = {"gpt_bigcode": ["c_attn", "c_proj"]}


def resolve(model: str) -> str:
    return str(embedded.tiny_starcoder_path()) if model == embedded.TINY_MODEL else model


def _not_found(model: str, error: Exception) -> UsageError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UsageError(f"could not load model {model!r}: {reason}. Check the hub id or path; for a gated model "
                      f"(bigcode/starcoder is one) accept its licence and set HF_TOKEN; offline, use a local path "
                      f"or `tiny-starcoder`.")


def load_tokenizer(model: str, token: str | None = None):
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve(model), token=token)
    except (OSError, ValueError) as error:
        raise _not_found(model, error) from None
    if tokenizer.pad_token is None:  # StarCoder has none; labels mask padding, so reusing EOS is safe
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def check_sequence_length(model: str, seq_length: int, token: str | None = None) -> None:
    """A sequence longer than the model's learned positions would index past its position table."""
    config = AutoConfig.from_pretrained(resolve(model), token=token)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and seq_length > limit:
        raise UsageError(f"--seq_length {seq_length} is above {model!r}'s maximum of {limit} positions")


def compute_dtype(requested: str = "auto") -> torch.dtype:
    """The requested dtype, or: bf16 where the GPU has it (Ampere and newer), fp16 on older GPUs, fp32 on the CPU
    (whose bf16 matmuls are slow)."""
    if requested != "auto":
        return getattr(torch, requested)
    if not torch.cuda.is_available():
        return torch.float32
    device()  # asks the current device, which must be this rank's
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def quantization_config(quantization: str, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if quantization != "none":
        try:
            import bitsandbytes  # noqa: F401  (transformers would fail later, deep inside from_pretrained)
        except ImportError as error:
            raise UsageError(f"--quantization {quantization} needs bitsandbytes, which cannot run here ({error}); "
                             f"install it, or use --quantization none") from None
    if quantization == "4bit":  # QLoRA (Dettmers et al. 2023): NF4 storage, double quantization, 16-bit compute
        # Under FSDP the packed 4-bit weights are stored as the compute dtype, since FSDP flattens each wrapped
        # module's parameters into one tensor of one dtype (peft's FSDP-QLoRA guide).
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_quant_storage=dtype if fsdp_enabled() else torch.uint8)
    if quantization == "8bit":  # LLM.int8 (Dettmers et al. 2022), the tutorial's choice
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


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


def load_model(model: str | None, quantization: str, dtype: torch.dtype | None = None,
               model_class=AutoModelForCausalLM, **from_pretrained_kwargs):
    """The base model, quantized as asked, on this process's device, in `dtype` (default: compute_dtype()). The
    benches build a model from in-memory weights through the same path: `model=None`, the architecture's class,
    and `config=` and `state_dict=`."""
    dtype = dtype or compute_dtype()
    placement = device()
    try:
        loaded = model_class.from_pretrained(
            resolve(model) if model else None, dtype=dtype,
            device_map=None if fsdp_enabled() else {"": placement},  # FSDP places the shards itself
            quantization_config=quantization_config(quantization, dtype), **from_pretrained_kwargs)
    except (OSError, ValueError) as error:
        raise _not_found(model, error) from None
    for module in loaded.modules():
        # bitsandbytes 0.50 repacks a CPU Linear4bit's weight for AVX512-BF16 at its first inference forward, and
        # a training forward after that (training resumed after an evaluation) fails in an in-place bias add.
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return loaded


def linear_layer_names(model) -> list[str]:
    """Distinct names (last path component) of the model's linear layers, bitsandbytes layers and GPT-2's Conv1D
    included: the names LoRA can target."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D))})


def lora_targets(model, requested: str) -> list[str]:
    available = linear_layer_names(model)
    if requested:
        targets = [name.strip() for name in requested.split(",") if name.strip()]
    else:
        model_type = model.config.model_type
        targets = DEFAULT_LORA_TARGETS.get(model_type) or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(
            model_type, [])
    if not set(targets) & set(available):
        raise UsageError(f"LoRA targets {targets} match no layer of this model; its linear layers are {available} "
                         f"(pass them with --lora_target_modules)")
    return targets


def add_lora(model, args):
    """Freeze the base and wrap it with a trainable LoRA adapter, as `args` (TrainArguments) say.

    `fp32_upcast`: peft's prepare_model_for_kbit_training, which keeps fp32 copies of every non-quantized weight
    (norms, embeddings, the tied LM head); each forward then casts them back to 16 bits. `fp32_adapter`: LoRA
    weights in fp32 (peft's default) rather than the model's dtype; fp16 needs them, for its loss scaler.
    """
    targets = lora_targets(model, args.lora_target_modules)
    if args.quantization != "none" and args.fp32_upcast:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable()  # non-reentrant (transformers' default): frozen inputs are fine
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    fp32_adapter = args.fp32_adapter or model.dtype == torch.float16
    return get_peft_model(model, config, autocast_adapter_dtype=fp32_adapter)
