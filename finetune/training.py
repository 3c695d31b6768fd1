"""Training: W&B set up to work offline by default, the Trainer with our defaults, and the end of a run."""

import glob
import netrc
import os
import random
import string
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from . import checkpointing, evaluation, manifest
from .cli import TrainArguments
from .data import collator
from .modeling import compute_dtype


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def setup_wandb(args: TrainArguments) -> None:
    """Point W&B at the output directory; without credentials (and no WANDB_MODE chosen), log offline so a run
    never blocks on a login prompt or the network. The run id is kept in the output directory, so a resumed run
    continues the same W&B run instead of starting a new one."""
    if args.report_to != "wandb":
        return
    os.environ.setdefault("WANDB_PROJECT", args.wandb_project)
    os.environ.setdefault("WANDB_DIR", os.path.abspath(args.output_dir))
    if "WANDB_MODE" not in os.environ and not _wandb_credentials():
        os.environ["WANDB_MODE"] = "offline"
    id_file = Path(args.output_dir) / "wandb_run_id"
    if int(os.environ.get("RANK", 0)) == 0 and (args.overwrite_output_dir or not id_file.is_file()):
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text("".join(random.SystemRandom().choices(string.ascii_lowercase + string.digits, k=8)))
    if id_file.is_file():  # set, not setdefault: a sweep's children must not inherit the parent's run
        os.environ["WANDB_RUN_ID"] = id_file.read_text().strip()
        os.environ["WANDB_RESUME"] = "allow"


def training_arguments(args: TrainArguments, **overrides) -> TrainingArguments:
    """The tutorial's Trainer settings on today's names (eval_strategy, not evaluation_strategy)."""
    dtype = torch.cuda.is_available() and compute_dtype(args.dtype)
    settings = dict(
        output_dir=checkpointing.staging(args.output_dir),  # CheckpointCallback commits each checkpoint from here
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        max_steps=args.max_train_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(10, args.max_train_steps // 10),
        eval_strategy="steps",
        eval_on_start=True,  # step 0: the base model's held-out loss (LoRA's B starts at zero)
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.eval_steps,  # keeping the newest two and the best: CheckpointCallback
        load_best_model_at_end=True,  # the adapter kept at the end is the one with the lowest eval loss
        metric_for_best_model="eval_loss",
        logging_steps=args.logging_steps,
        bf16=dtype == torch.bfloat16 and args.mixed_precision,  # off: a bf16 model simply computes in bf16
        fp16=dtype == torch.float16,  # fp16 always needs autocast and the loss scaler
        report_to=[args.report_to] if args.report_to != "none" else "none",
        run_name=os.path.basename(os.path.abspath(args.output_dir)),
        seed=args.seed,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # every LoRA weight is used in every step: skip DDP's extra graph walk
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def length_grouped(enabled: bool) -> dict:
    """Trainer settings for batches of similar lengths (less padding); the name changed within transformers 5."""
    if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__:
        return {"train_sampling_strategy": "group_by_length" if enabled else "random"}
    return {"group_by_length": enabled}


def build_trainer(args: TrainArguments, model, tokenizer, train_set, eval_set, callbacks=(),
                  **training_overrides) -> Trainer:
    """The Trainer, writing checkpoints into a staging area that CheckpointCallback commits atomically."""
    setup_wandb(args)
    trainer = Trainer(model=model, args=training_arguments(args, **training_overrides),
                      train_dataset=train_set, eval_dataset=eval_set, data_collator=collator(tokenizer),
                      processing_class=tokenizer)
    # Our callbacks go first: metrics they add to the logs in on_log then reach the console and W&B, whose
    # callbacks the Trainer registered before any passed in.
    checkpoints = checkpointing.CheckpointCallback(args.output_dir, grace_period=args.grace_period_seconds)
    trainer.callback_handler.callbacks[:0] = [*callbacks, checkpoints]
    return trainer


def train(trainer: Trainer, args: TrainArguments, resume_from: str | None) -> None:
    """Train from scratch or from `resume_from`; a SIGTERM/SIGINT ends here, after its checkpoint, as Stopped."""
    if trainer.is_world_process_zero():
        checkpointing.start(args)
        world = trainer.args.world_size
        print(f"effective batch size: {args.batch_size} per device x {world} process{'es' * (world > 1)} = "
              f"{args.batch_size * world * trainer.args.gradient_accumulation_steps} sequences per step"
              + (f"; resuming from {resume_from}" if resume_from else ""), flush=True)
    trainer.accelerator.wait_for_everyone()
    trainer.train(resume_from_checkpoint=resume_from)
    handler = trainer.callback_handler
    next(cb for cb in handler.callbacks if isinstance(cb, checkpointing.CheckpointCallback)).raise_if_stopped(
        trainer.state)


def save_fsdp_adapter(trainer: Trainer, output_dir: str) -> None:
    """Under FSDP, gather the adapter onto rank 0 and write it as peft does (keys without the adapter name).
    Checkpoints stay sharded (resumable). Not save_model: peft 0.21 finds adapter weights by module name, strips only
    a leading `_fsdp_wrapped_module.`, and so wrote an empty adapter when FSDP wraps every block (2 H200s,
    2026-11-28)."""
    state = trainer.accelerator.get_state_dict(trainer.model)  # a collective: every rank joins, rank 0 gets it
    if not trainer.is_world_process_zero():
        return
    from safetensors.torch import save_file

    model = trainer.accelerator.unwrap_model(trainer.model)
    adapter = {key.replace(f".{model.active_adapter}.", "."): value for key, value in state.items() if "lora_" in key}
    os.makedirs(output_dir, exist_ok=True)
    save_file(adapter, os.path.join(output_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    model.peft_config[model.active_adapter].save_pretrained(output_dir)
    trainer.processing_class.save_pretrained(output_dir)


def finish(trainer: Trainer, args: TrainArguments, *more_arguments, **metrics) -> dict[str, float]:
    """Save the (best) adapter to output_dir, compare it with the base on the held-out split (logged beside the
    eval loss), write the run's manifest, close the W&B run, and say where an offline run went."""
    if trainer.is_fsdp_enabled:
        save_fsdp_adapter(trainer, args.output_dir)
    else:
        trainer.save_model(args.output_dir)
    comparison = evaluation.compare(trainer.model, trainer.eval_dataset, trainer.processing_class,
                                    trainer.args.per_device_eval_batch_size)
    trainer.log({f"eval_{key}": value for key, value in comparison.items()})
    if trainer.is_world_process_zero():
        print(evaluation.describe(comparison))
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        manifest.write(args.output_dir, [args, *more_arguments], {
            "global_step": trainer.state.global_step, "final_train_loss": losses[-1] if losses else None,
            **comparison, **metrics})
    if "wandb" in trainer.args.report_to and trainer.is_world_process_zero():
        end_wandb_run()
    return comparison


def end_wandb_run() -> None:
    """Close this process's W&B run and forget its settings (its directory), so a later run in this process (a
    test, a notebook, the sweep's summary) gets its own; offline, say how to upload it."""
    import wandb  # only when W&B is in use

    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()
    if os.environ.get("WANDB_MODE") == "offline":
        runs = sorted(glob.glob(os.path.join(os.environ["WANDB_DIR"], "wandb", "offline-run-*")))
        if runs:
            print(f"W&B ran offline; upload the run with: wandb sync {runs[-1]}")
