"""Part 4 — speed-ups: data loader workers, pinned memory, cudnn.benchmark, packing and the batch size.

    python karpathy_speedups_example.py --batch_size 8 --num_workers 4              # one run with the knobs
    python karpathy_speedups_example.py --sweep_batch_sizes auto --output_dir sweep  # the study: table and plots

Named after Andrej Karpathy's list of PyTorch speed-ups that the tutorial follows. Each knob, and why:
- `--num_workers N`: batches are collated in N background processes (kept alive between epochs) instead of between
  GPU steps. Under Kubernetes, request more CPUs than workers: the training process needs one of its own.
- `--pin_memory` (default on): page-locked host buffers let the copy to the GPU run asynchronously.
- `--cudnn_benchmark`: lets cuDNN time its algorithms and keep the fastest for each input shape; pays when
  shapes repeat (packing, fixed lengths).
- `--packing`: examples packed into full `seq_length` blocks, so no FLOP is spent on padding; without it,
  batches are grouped by length to waste less on padding.
- the batch size: bigger batches keep the GPU busier until memory runs out; the sweep finds where.
Throughput counts non-padding tokens only, so packed and padded runs compare honestly. The sweep (`--sweep_*`,
`--merge_results`) runs this script once per configuration: finetune/sweep.py.
"""

import math
import os
from dataclasses import dataclass, field

from finetune import cli, sweep
from finetune.cli import TrainArguments
from finetune.errors import UsageError
from finetune.sweep import SweepArguments


@dataclass
class SpeedupArguments:
    _argument_group_name = "speed-ups (Part 4)"

    num_workers: int = field(default=2, metadata={"help": "Data loader worker processes (persistent)."})
    pin_memory: bool = field(default=True, metadata={"help": "Pin host memory for asynchronous copies to the GPU."})
    cudnn_benchmark: bool = field(default=False, metadata={"help": "Set torch.backends.cudnn.benchmark."})
    memory_metrics: bool = field(default=False, metadata={"help": "Have the Trainer report memory per stage."})
    memory_budget_gib: float = field(default=0.0, metadata={
        "help": "Cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction) and recommend the "
                "fastest configuration within it: plan for a smaller card on a bigger one. 0: no cap."})

    def __post_init__(self):
        if self.num_workers < 0:
            raise UsageError(f"--num_workers must be 0 or more, got {self.num_workers}")
        if not (math.isfinite(self.memory_budget_gib) and self.memory_budget_gib >= 0):
            raise UsageError(f"--memory_budget_gib must be a number, 0 or more, got {self.memory_budget_gib}")


def check_workers(speed: SpeedupArguments, sweeping: SweepArguments | None) -> None:
    """Each data loader worker is a process: more than the CPUs this process may use only contend for them (a typo's
    100000 forked until the kernel killed the run). Checked here, not as the arguments parse: it is this machine's
    limit, and a Job's arguments are parsed elsewhere too. The default runs anywhere."""
    if sweeping is not None and sweeping.merge_results:
        return  # runs nothing
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = max(cpus, SpeedupArguments.num_workers)
    flag, counts = (("--sweep_num_workers", sweeping.worker_counts) if sweeping and sweeping.worker_counts else
                    ("--num_workers", [speed.num_workers]))
    if max(counts) > limit:
        raise UsageError(f"{flag} asks for {max(counts)} data loader workers, and this process may use {cpus} CPUs: "
                         f"each worker is a process of its own; give at most {limit}")


def main(args: TrainArguments, speed: SpeedupArguments, sweeping: SweepArguments | None = None):
    check_workers(speed, sweeping)
    if sweeping is not None and sweeping.requested:
        return sweep.main(__file__, args, speed, sweeping)  # the study: many runs of this script
    import torch  # the libraries load once the arguments are valid: --help answers at once

    from finetune import modeling, pipeline, training
    from flops_counter import TFLOPSCallback

    torch.backends.cudnn.benchmark = speed.cudnn_benchmark
    if speed.memory_budget_gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(modeling.device()).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, speed.memory_budget_gib * 2**30 / total))
    run = pipeline.prepare(args)  # Part 1's data, quantized base and LoRA
    tflops = TFLOPSCallback()
    trainer = training.build_trainer(
        args, run, callbacks=[tflops], more_arguments=(speed,),
        dataloader_num_workers=speed.num_workers,
        dataloader_persistent_workers=speed.num_workers > 0,
        dataloader_pin_memory=speed.pin_memory and torch.cuda.is_available(),
        **training.length_grouped(not args.packing),
        skip_memory_metrics=not speed.memory_metrics,
    )
    training.train(trainer, args, run)
    # result.json first, so the manifest (written last, when the run has finished) lists it among the run's files
    result = sweep.record_run(args.output_dir, args, speed, tflops.summary, tflops.warmup_steps)
    training.finish(trainer, args, run, speed, throughput=tflops.summary)
    return result


if __name__ == "__main__":
    cli.run(main, TrainArguments, SpeedupArguments, SweepArguments)
