"""Training: the Trainer with our defaults, the run itself, and what a finished run leaves behind."""

import dataclasses
import os
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainerState, TrainingArguments, get_scheduler

from . import checkpointing, console, evaluation, files, hub, humaneval, manifest, tracking
from .cli import TrainArguments
from .data import Collator
from .errors import UsageError
from .modeling import autocast_dtype, compute_dtype
from .pipeline import Prepared


def training_arguments(args: TrainArguments, **overrides) -> TrainingArguments:
    """The tutorial's Trainer settings on today's names (eval_strategy, not evaluation_strategy)."""
    autocast = torch.cuda.is_available() and autocast_dtype(compute_dtype(args.dtype), args.mixed_precision)
    settings = dict(
        output_dir=checkpointing.staging(args.output_dir),  # CheckpointCallback commits each checkpoint from here
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_steps=args.max_train_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        eval_strategy="steps",
        eval_on_start=True,  # step 0: the base model's held-out loss (LoRA's B starts at zero)
        eval_steps=args.eval_steps,
        prediction_loss_only=True,  # evaluation needs the loss only: no logits gathered
        save_strategy="steps",
        save_steps=args.eval_steps,  # keeping the newest two and the best: CheckpointCallback
        load_best_model_at_end=True,  # the adapter kept at the end is the one with the lowest eval loss
        metric_for_best_model="eval_loss",
        logging_steps=args.logging_steps,
        # A NaN or infinite loss is logged as it is, not replaced by the mean of the losses before it. Checking for it
        # also made the CPU wait, every step, for the GPU to finish the backward, after which the Trainer's Python
        # between the backward and the optimizer step (8 ms on an H100) left the GPU idle; without the check it runs
        # while the GPU works through the queued backward (docs/PERFORMANCE.md, 2026-12-06).
        logging_nan_inf_filter=False,
        bf16=autocast == torch.bfloat16,
        fp16=autocast == torch.float16,
        report_to=[args.report_to] if args.report_to != "none" else "none",
        run_name=os.path.basename(os.path.abspath(args.output_dir)),
        seed=args.seed,
        disable_tqdm=True,  # console.ConsoleCallback shows progress and log lines instead
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


def build_trainer(args: TrainArguments, run: Prepared, callbacks=(), more_arguments=(),
                  **training_overrides) -> Trainer:
    """The Trainer, writing checkpoints into a staging area that CheckpointCallback commits atomically, printing
    through ConsoleCallback, logging to a W&B run that holds all the arguments."""
    if int(os.environ.get("RANK", 0)) == 0:
        run.existing = checkpointing.start(args)
    tracking.configure(args)
    tracking.start_run(args, *more_arguments)
    trainer = Trainer(model=run.model, args=training_arguments(args, **training_overrides),
                      train_dataset=run.train_set, eval_dataset=run.eval_set,
                      data_collator=Collator(run.tokenizer), processing_class=run.tokenizer)
    trainer.remove_callback(PrinterCallback)
    # Our callbacks go first: metrics they add to the logs in on_log then reach the console and W&B, whose
    # callbacks the Trainer registered before any passed in.
    checkpoints = checkpointing.CheckpointCallback(args.output_dir, run.run_config,
                                                   grace_period=args.grace_period_seconds)
    trainer.callback_handler.callbacks[:0] = [*callbacks, checkpoints]
    trainer.add_callback(console.ConsoleCallback())
    trainer.add_callback(DivergenceGuard())  # after the Trainer's own: it reads which steps log, evaluate or save
    if run.finished_at:
        trainer.add_callback(ScheduleSegment(run.finished_at, args))
    return trainer


class DivergenceGuard(TrainerCallback):
    """Stops a run whose adapter weights turned NaN or infinite (a learning rate too high, an fp16 overflow its loss
    scaler did not catch) before it evaluates or saves them: no checkpoint holds damaged weights, and train() refuses
    to finish the run. Looked at only on steps that log, evaluate or save, which wait for the GPU anyway: a check
    every step would make the CPU wait for it every step (docs/PERFORMANCE.md, 2026-12-06). A step that fp16's loss
    scaler skipped (a non-finite loss, the weights untouched) is no divergence."""

    def __init__(self):
        self.step: int | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not (control.should_log or control.should_evaluate or control.should_save):
            return
        trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
        norms = torch._foreach_norm(trained) if trained else []  # a few kernels for every weight, one wait
        finite = bool(torch.stack([norm.float() for norm in norms]).isfinite().all()) if norms else True
        if checkpointing.any_rank(not finite, args.device):
            self.step = state.global_step
            control.should_evaluate = control.should_save = False
            control.should_training_stop = True


class ScheduleSegment(TrainerCallback):
    """Training on from a finished run (--max_train_steps raised past it) means a further fine-tune of the same
    adapter, with the optimizer's state: the added steps get a schedule of their own, warm-up and decay over them from
    --learning_rate, as a fresh run's over its steps (a warm restart, Loshchilov and Hutter 2017, "SGDR"). The
    Trainer would instead stretch the finished schedule over the new total, raising the rate from its end value to
    wherever the stretched curve is. (A stopped run resumed with another --max_train_steps, which had not finished its
    decay, keeps the Trainer's schedule over the new total.)"""

    def __init__(self, start: int, args: TrainArguments):
        self.start, self.args = start, args

    def on_train_begin(self, args, state, control, lr_scheduler=None, optimizer=None, **kwargs):
        steps = self.args.max_train_steps - self.start
        warmup = dataclasses.replace(self.args, max_train_steps=steps).warmup
        warmup = round(warmup * steps) if isinstance(warmup, float) else warmup
        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        shape = get_scheduler(self.args.lr_scheduler_type, dummy, num_warmup_steps=warmup,
                              num_training_steps=steps).lr_lambdas[0]
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
        scheduler.lr_lambdas = [lambda step: shape(max(0, step - self.start))] * len(scheduler.lr_lambdas)
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * shape(0)  # the first added step's rate; the scheduler takes it from there
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what the Trainer logs
        print(f"training on from step {self.start} of a finished run: a new {self.args.lr_scheduler_type} schedule "
              f"over the {steps} added steps, warm-up {warmup}", flush=True)


def train(trainer: Trainer, args: TrainArguments, run: Prepared) -> None:
    """Train from scratch or from the checkpoint `run` resumes; a SIGTERM/SIGINT ends here, after its checkpoint,
    as Stopped."""
    if trainer.is_world_process_zero():
        world = trainer.args.world_size
        accumulation = trainer.args.gradient_accumulation_steps
        micro_batches = f" x {accumulation} micro-batches" if accumulation > 1 else ""
        print(f"effective batch size: {args.batch_size} per device{micro_batches} x {world} process"
              f"{'es' * (world > 1)} = "
              f"{args.batch_size * accumulation * world} sequences per step"
              + (f"; resuming from {run.resume_from}" if run.resume_from else ""), flush=True)
    trainer.accelerator.wait_for_everyone()
    if run.resume_from and checkpointing.step_of(run.resume_from) >= args.max_train_steps:
        # Every step is trained (a run stopped after its last checkpoint, or whose manifest was lost): the Trainer
        # would train one more step on resuming there, so restore its state and the best adapter instead.
        restore(trainer, run.resume_from)
        return
    with files.writes_into(args.output_dir, lambda: last_checkpoint(args.output_dir)):
        trainer.train(resume_from_checkpoint=run.resume_from)
    handler = trainer.callback_handler
    next(cb for cb in handler.callbacks if isinstance(cb, checkpointing.CheckpointCallback)).raise_if_stopped(
        trainer.state)
    diverged = next(cb for cb in handler.callbacks if isinstance(cb, DivergenceGuard)).step
    if diverged is not None:
        kept = last_checkpoint(args.output_dir)
        fp16 = ", or compute in bfloat16 rather than float16 (--dtype bfloat16)" if trainer.args.fp16 else ""
        kept = f"checkpoint kept: {kept}" if kept else "no checkpoint"
        raise UsageError(f"the adapter's weights became NaN or infinite by step {diverged} (the training diverged): "
                         f"the run stopped before saving them ({kept}). Lower --learning_rate (now "
                         f"{args.learning_rate:g}){fp16}, and start again with a new --output_dir or "
                         f"--overwrite_output_dir")


def restore(trainer: Trainer, checkpoint: str) -> None:
    """The Trainer's state at `checkpoint` (its steps, log and best checkpoint), and the best checkpoint's adapter in
    the model, as at the end of training."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    best = trainer.state.best_model_checkpoint or checkpoint
    weights = load_file(os.path.join(best, "adapter_model.safetensors"), device=str(trainer.args.device))
    set_peft_model_state_dict(trainer.model, weights)


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


def last_checkpoint(output_dir: str) -> str | None:
    found = checkpointing.complete_checkpoints(output_dir)
    return str(found[-1]) if found else None


def finish(trainer: Trainer, args: TrainArguments, run: Prepared, *more_arguments, throughput=None) -> dict:
    """Save the (best) adapter to output_dir; compare it with the base on the held-out split (and on HumanEval with
    --humaneval, --humaneval_infilling), logged beside the eval loss; close the W&B run; write the model card, then
    the manifest last (its presence marks the run finished, and it records what the run wrote); print the run's
    summary; upload with --push_to_hub. Returns the metrics."""
    last_good = lambda: last_checkpoint(args.output_dir)  # noqa: E731
    with files.writes_into(args.output_dir, last_good):
        if trainer.is_fsdp_enabled:
            save_fsdp_adapter(trainer, args.output_dir)
        else:
            trainer.save_model(args.output_dir)
    batch_size = trainer.args.per_device_eval_batch_size
    metrics = {"global_step": trainer.state.global_step, "held_out_examples": len(run.eval_set),
               **evaluation.compare(trainer.model, run.eval_set, run.tokenizer, batch_size)}
    if run.infilling_texts:  # trained in FIM form: fill a line of each held-out file
        metrics.update(evaluation.compare_infilling(trainer.model, run.infilling_texts, run.tokenizer, run.fim_tokens,
                                                    args.seq_length, args.seed))
    if trainer.is_world_process_zero():  # one process generates and runs the samples
        if args.humaneval:
            metrics.update(humaneval.compare(trainer.model, run.tokenizer, args.output_dir, args.humaneval_limit))
        if args.humaneval_infilling:
            metrics.update(humaneval.compare_infilling(trainer.model, run.tokenizer, run.fim_tokens, args.output_dir,
                                                       args.humaneval_limit))
    trainer.log({f"eval_{key}": value for key, value in metrics.items() if key != "global_step"})
    if not trainer.is_world_process_zero():
        return metrics
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    metrics = {**metrics, "final_train_loss": losses[-1] if losses else None, **(throughput or {})}
    where = tracking.end_run() if "wandb" in trainer.args.report_to else None
    best = trainer.state.best_model_checkpoint
    with files.writes_into(args.output_dir, last_good):
        files.write_atomically(Path(args.output_dir) / hub.CARD,
                               hub.card(args, metrics, manifest.provenance()["device"]))
        outputs = checkpointing.written_since(args.output_dir, run.existing)
        for name in outputs:
            files.share(Path(args.output_dir) / name)
        manifest.write(args.output_dir, [args, *more_arguments], metrics, outputs=outputs,
                       best_checkpoint=Path(best).name if best else None)
    checkpointing.release(args.output_dir)
    console.summary(args.output_dir, best, metrics, where, "GPU" if torch.cuda.is_available() else "process")
    if args.push_to_hub:
        hub.push(args, list(outputs))
    return metrics
