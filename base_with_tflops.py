"""Part 2 — the base example, measuring how fast it trains: achieved TFLOPs and MFU, logged to W&B.

    python base_with_tflops.py --model tiny-starcoder --dataset stdlib-code   # CPU demo: TFLOPs, no MFU
    python base_with_tflops.py                                                 # StarCoder on a GPU, with MFU

The same fine-tune as base_example.py, with flops_counter.TFLOPSCallback added to the Trainer. With no W&B
credentials the run is logged offline under --output_dir (`wandb sync` uploads it later).
"""

from base_example import prepare
from finetune import cli, training
from finetune.cli import TrainArguments
from flops_counter import TFLOPSCallback


def main(args: TrainArguments):
    tokenizer, model, train_set, eval_set, resume_from = prepare(args)
    tflops = TFLOPSCallback()
    trainer = training.build_trainer(args, model, tokenizer, train_set, eval_set, callbacks=[tflops])
    training.train(trainer, args, resume_from)
    training.finish(trainer, args, **tflops.summary)
    if trainer.is_world_process_zero():
        print("throughput:", ", ".join(f"{key}={value:.4g}" for key, value in tflops.summary.items()))
    return trainer


if __name__ == "__main__":
    cli.run(main, TrainArguments)
