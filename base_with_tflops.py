"""Part 2 — the base example, measuring how fast it trains: achieved TFLOPs and MFU, logged to W&B.

    python base_with_tflops.py --model tiny-starcoder --dataset stdlib-code   # CPU demo: TFLOPs, no MFU
    python base_with_tflops.py --recipe fast                                   # StarCoder on a GPU, with MFU

The same fine-tune as base_example.py, with flops_counter.TFLOPSCallback added to the Trainer. With no W&B
credentials the run is logged offline under --output_dir (`wandb sync` uploads it later).
"""

from finetune import cli
from finetune.cli import TrainArguments


def main(args: TrainArguments):
    from finetune import pipeline, training  # the libraries load once the arguments are valid: --help answers at once
    from flops_counter import TFLOPSCallback

    run = pipeline.prepare(args)  # Part 1's data, quantized base and LoRA
    tflops = TFLOPSCallback()
    trainer = training.build_trainer(args, run, callbacks=[tflops])
    training.train(trainer, args, run)
    training.finish(trainer, args, run, throughput=tflops.summary)
    return trainer


if __name__ == "__main__":
    cli.run(main, TrainArguments)
