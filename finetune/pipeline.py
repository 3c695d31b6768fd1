"""Everything before training that the three training scripts share, in Part 1's order: check the input, load and
tokenize the data, claim the output directory, load the quantized base, add LoRA.

Bad input stops here with a UsageError, before anything is written; so does a run that already finished (Finished).
"""

import dataclasses
import os
from dataclasses import dataclass

from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import BitsAndBytesConfig, set_seed

from . import (attention, checkpointing, chunked_loss, data, fim, fp8, fusion, hub, memory, modeling, offload,
               tracking)
from .cli import TrainArguments
from .errors import UsageError


@dataclass
class Prepared:
    tokenizer: object
    model: PeftModel
    train_set: Dataset
    eval_set: Dataset
    resume_from: str | None  # the checkpoint this run continues from, or None for a fresh start
    run_config: dict  # what a resumed run must share with this one (recorded with the first checkpoint)
    finished_at: int = 0  # the step a finished run ended at, when a raised --max_train_steps trains it on
    fim_tokens: fim.FimTokens | None = None  # the tokenizer's FIM tokens, when it has them
    infilling_texts: list[str] = dataclasses.field(default_factory=list)  # held-out code, when FIM trains
    existing: dict = dataclasses.field(default_factory=dict)  # top-level files before the run (checkpointing.start)


def prepare(args: TrainArguments, quantization: BitsAndBytesConfig | None = None,
            lora: LoraConfig | None = None) -> Prepared:
    """Part 1 up to training. `quantization` and `lora` are the two configurations base_example.py builds in view;
    when not given they are built the same way from `args`."""
    tracking.choose_mode(args)
    hub.check(args)
    if args.fp8_off:
        modeling.check_fp8(args.named(*args.fp8_off), args.ways_to(**args.fp8_off))
    modeling.check_quantization(args.quantization)
    if args.offloaded_layers and modeling.fsdp_enabled():
        raise UsageError(f"{args.named('offloaded_layers')} is not built for FSDP, whose gathered weights it would "
                         f"copy out as activations: {args.ways_to(offloaded_layers=0)}")
    quantization = quantization or modeling.quantization_config(args.quantization, modeling.compute_dtype(args.dtype))
    lora = lora or modeling.lora_config(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
    token = args.hf_token or None  # else huggingface_hub reads $HF_TOKEN
    config = modeling.check_model(args.model, args.seq_length, token)
    lora = dataclasses.replace(lora, target_modules=modeling.lora_targets(config, lora.target_modules))
    modeling.check_rank(config, lora.target_modules, lora.r)
    memory.check(args, config, lora.target_modules, chunked_loss=not modeling.fsdp_enabled())
    tokenizer = modeling.load_tokenizer(args.model, token)

    train_examples, eval_examples, data_format, digest = data.load_splits(
        args.dataset, args.prompt_column, args.completion_column, tokenizer, token, args.max_eval_samples, args.seed,
        args.dataset_split, args.eval_dataset, args.eval_split, args.extensions, args.max_file_bytes)
    prompted = data.has_prompts(train_examples)
    completion_only = prompted if args.completion_only_loss is None else args.completion_only_loss
    if completion_only and not prompted:
        raise UsageError(f"--completion_only_loss true needs prompts, and {args.dataset!r} is {data_format} data "
                         f"with none: every token is trained already; leave out --completion_only_loss")
    per_example = args.packing and args.packed_attention == "per_example"
    append_eos = data_format != "chat_template"  # a chat template ends each turn itself
    fim_options = fim.options(args, tokenizer, data_format)
    fim_tokens = fim.tokens(tokenizer, args.model) if args.humaneval_infilling else fim.find(tokenizer)
    train_set = data.tokenize(train_examples, tokenizer, args.seq_length, args.packing, completion_only, per_example,
                              append_eos, fim_options, args.seed)
    eval_set = data.tokenize(eval_examples, tokenizer, args.seq_length, completion_only=completion_only,
                             append_eos=append_eos)
    what = "packed training blocks" if args.packing else "training examples"
    data.check_labels(train_set, what, args.seq_length)
    data.check_labels(eval_set, "held-out examples", args.seq_length)
    data.warn_if_few_held_out(len(eval_set))
    world = int(os.environ.get("WORLD_SIZE", 1))
    per_step = args.batch_size * args.gradient_accumulation_steps * world
    if per_step > len(train_set):
        raise UsageError(f"a step takes {per_step} {what} (--batch_size {args.batch_size} x "
                         f"--gradient_accumulation_steps {args.gradient_accumulation_steps} x {world} process"
                         f"{'es' * (world > 1)}) and there are {len(train_set)}; lower --batch_size")
    if args.num_train_epochs is not None:
        steps = args.steps_for(len(train_set), world)
        print(f"--max_train_steps {args.max_train_steps} wins over --num_train_epochs {args.num_train_epochs:g}"
              if args.max_train_steps is not None else
              f"{args.num_train_epochs:g} epoch(s) of {len(train_set):,} {what} at {per_step} a step: {steps} steps",
              flush=True)
        args.max_train_steps = steps
    run_config = {**checkpointing.comparable(args, digest), "data_format": data_format}
    # --resume auto: the newest intact checkpoint of this run; and the step a finished run ended at, if it trains on
    resume_from, finished_at = checkpointing.claim(args, run_config)

    model = model_for_training(args, quantization, lora, args.model, per_example, tokenizer.pad_token_id, token=token)
    infilling_texts = [segments[1] for segments in eval_examples["segments"]] if fim_options else []
    return Prepared(tokenizer, model, train_set, eval_set, resume_from, run_config, finished_at, fim_tokens,
                    infilling_texts)


def model_for_training(args: TrainArguments, quantization: BitsAndBytesConfig | None, lora: LoraConfig,
                       model: str | None, per_example: bool, pad_token_id: int = 0, **from_pretrained_kwargs):
    """The base loaded and quantized, with per-example attention for packed data, LoRA, FP8 base layers where asked,
    and the chunked loss. The benches build a model from in-memory weights through this path too (`model=None`,
    the architecture's class, `config=` and `state_dict=`)."""
    # An FP8 base loads in 16 bits on the CPU and reaches the GPU a layer at a time as it is quantized (fp8.convert):
    # a 24 GB card holds StarCoder-15B in FP8 (15 GiB) but not in bf16 (29 GiB).
    fp8_base = args.quantization == "fp8"
    model = modeling.load_model(model, quantization, modeling.compute_dtype(args.dtype), on_cpu=fp8_base,
                                **from_pretrained_kwargs)
    model.config.pad_token_id = model.generation_config.pad_token_id = pad_token_id
    if per_example:
        attention.use(model)
    set_seed(args.seed)  # LoRA's A matrices are drawn now, before the Trainer seeds: same seed, same run
    model = modeling.add_lora(model, lora, args.fp32_upcast, args.gradient_checkpointing, args.fp32_adapter)
    checkpointed, recompute_gelu = memory.plan(args, model.config, lora.target_modules,
                                               chunked_loss=not modeling.fsdp_enabled())
    modeling.checkpoint_only_first(model, checkpointed)
    offloaded = offload.plan(checkpointed, args.offloaded_layers)
    # the checkpointed layers that recompute (not offloaded whole) keep their inputs in CPU memory
    inputs_offloaded = [i for i in range(checkpointed) if i not in offloaded] if args.offload_layer_inputs else []
    if int(os.environ.get("RANK", 0)) == 0:
        model.print_trainable_parameters()
        if args.gradient_checkpointing:
            print(f"activation checkpointing in {checkpointed} of {model.config.num_hidden_layers} decoder layers"
                  + (f", {len(offloaded)} of them offloaded to CPU memory instead of recomputed" if offloaded else "")
                  + (f", {len(inputs_offloaded)} with their inputs in CPU memory" if inputs_offloaded else ""),
                  flush=True)
    if fp8_base:
        fp8.convert(model, modeling.device())  # after LoRA: its A and B stay trainable bf16 layers
        model.to(modeling.device())  # the rest: embeddings, norms, LoRA
    if args.fp8_matmuls:
        fp8.multiply_4bit_in_fp8(model)
    if args.fuse_lora:
        # not in compiled layers: dynamo traces the checkpoint whole, recompute included, and the skip would break it
        fusion.fuse_lora(model, recompute_gelu, skip_unread=args.takes_fused_path and not args.compile_layers)
    if args.compile_layers:
        fusion.compile_layers(model)
    # Not under FSDP: the head's weights are gathered by FSDP's forward hooks, which a head called from inside the
    # chunked loss's own forward would not go through.
    if not modeling.fsdp_enabled() and not any(p.requires_grad for p in model.get_output_embeddings().parameters()):
        chunked_loss.use(model.get_base_model())
    if offloaded or inputs_offloaded:
        layers = modeling.decoder_layers(model)
        offload.use(model, [layers[i] for i in offloaded], [layers[i] for i in inputs_offloaded])
    return model
