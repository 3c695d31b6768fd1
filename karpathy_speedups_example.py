"""Part 4 — speed-ups: data loader workers, pinned memory, cudnn.benchmark, packing and the batch size.

    python karpathy_speedups_example.py --batch_size 8 --num_workers 4              # one run
    python karpathy_speedups_example.py --sweep_batch_sizes auto --output_dir sweep  # the study: table and plots
    python karpathy_speedups_example.py --merge_results sweep/pod-* --output_dir sweep  # join separate jobs' results

Named after Andrej Karpathy's list of PyTorch speed-ups that the tutorial follows. Each knob, and why:
- `--num_workers N`: batches are collated in N background processes (kept alive between epochs) instead of between
  GPU steps. Under Kubernetes, request more CPUs than workers: the training process needs one of its own.
- `--pin_memory` (default on): page-locked host buffers let the copy to the GPU run asynchronously.
- `--cudnn_benchmark`: lets cuDNN time its algorithms and keep the fastest for each input shape; pays when
  shapes repeat (packing, fixed lengths).
- `--packing`: examples joined with EOS into full `seq_length` blocks, so no FLOP is spent on padding; without it,
  batches are grouped by length to waste less on padding.
- the batch size: bigger batches keep the GPU busier until memory runs out; the sweep finds where.
Throughput counts non-padding tokens only, so packed and padded runs compare honestly.
"""

import os
from dataclasses import dataclass, field

import torch

from base_example import prepare
from finetune import cli, sweep, training
from finetune.cli import TrainArguments
from flops_counter import TFLOPSCallback


@dataclass
class SpeedupArguments:
    num_workers: int = field(default=2, metadata={"help": "Data loader worker processes (persistent)."})
    pin_memory: bool = field(default=True, metadata={"help": "Pin host memory for asynchronous copies to the GPU."})
    cudnn_benchmark: bool = field(default=False, metadata={"help": "Set torch.backends.cudnn.benchmark."})
    memory_metrics: bool = field(default=False, metadata={"help": "Have the Trainer report memory per stage."})
    memory_budget_gib: float = field(default=0.0, metadata={
        "help": "Cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction) and recommend the "
                "fastest configuration within it: plan for a smaller card on a bigger one."})
    sweep_batch_sizes: str = field(default="", metadata={
        "help": "Sweep: comma-separated batch sizes, or `auto` (double from 1 until OOM or no gain)."})
    sweep_num_workers: str = field(default="", metadata={"help": "Sweep axis: comma-separated worker counts."})
    sweep_pin_memory: str = field(default="", metadata={"help": "Sweep axis: e.g. `true,false`."})
    sweep_packing: str = field(default="", metadata={"help": "Sweep axis: e.g. `false,true`."})
    sweep_gradient_checkpointing: str = field(default="", metadata={"help": "Sweep axis: e.g. `false,true`."})
    sweep_index: int = field(default=-1, metadata={
        "help": "Run only configuration N of a listed sweep, then merge the results present (a Kubernetes "
                "Indexed Job passes its completion index; see k8s/)."})
    merge_results: list[str] = field(default_factory=list, metadata={
        "help": "Merge the result.json files in these directories (and one level below) into --output_dir."})


def main(args: TrainArguments, speed: SpeedupArguments):
    if speed.merge_results:
        return sweep.merge(speed.merge_results, args.output_dir, speed.memory_budget_gib)
    if any(getattr(speed, name) for name in ("sweep_batch_sizes", "sweep_num_workers", "sweep_pin_memory",
                                               "sweep_packing", "sweep_gradient_checkpointing")):
        training.setup_wandb(args)  # children inherit the W&B settings and join one group
        os.environ.setdefault("WANDB_RUN_GROUP", os.path.basename(os.path.abspath(args.output_dir)))
        rows = sweep.run(os.path.abspath(__file__), args, speed)
        if args.report_to == "wandb":
            sweep.log_summary_to_wandb(rows, args.output_dir)
        return rows

    torch.backends.cudnn.benchmark = speed.cudnn_benchmark
    if speed.memory_budget_gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, speed.memory_budget_gib * 2**30 / total))
    tokenizer, model, train_set, eval_set, resume_from = prepare(args)
    tflops = TFLOPSCallback()
    trainer = training.build_trainer(
        args, model, tokenizer, train_set, eval_set, callbacks=[tflops],
        dataloader_num_workers=speed.num_workers,
        dataloader_persistent_workers=speed.num_workers > 0,
        dataloader_pin_memory=speed.pin_memory and torch.cuda.is_available(),
        **training.length_grouped(not args.packing),
        skip_memory_metrics=not speed.memory_metrics,
    )
    training.train(trainer, args, resume_from)
    training.finish(trainer, args, speed, **tflops.summary)
    config = dict(batch_size=args.batch_size, num_workers=speed.num_workers, pin_memory=speed.pin_memory,
                  packing=args.packing, gradient_checkpointing=args.gradient_checkpointing)
    if "tokens_per_second" not in tflops.summary:  # every step was a warm-up step
        return sweep.write_result(args.output_dir, config, "error", error=f"no step measured after the "
                                  f"{tflops.warmup_steps} warm-up steps; raise --max_train_steps")
    return sweep.write_result(args.output_dir, config, "ok", tflops.summary)


if __name__ == "__main__":
    cli.run(main, TrainArguments, SpeedupArguments)
