"""Part 1 — the base example: fine-tune StarCoder with a LoRA adapter on a quantized base (QLoRA).

    python base_example.py                                                 # StarCoder 15.5B on CodeAlpaca (GPU)
    python base_example.py --model tiny-starcoder --dataset stdlib-code   # the embedded demo, CPU, offline

Two configurations make the fine-tune: how the frozen base is stored (bitsandbytes' 4-bit NormalFloat) and what
trains on top of it (a LoRA adapter). Then: tokenize the data, load the quantized base, add LoRA, train with the
Hugging Face Trainer evaluating as it goes, and keep the best adapter.
"""

from finetune import cli, modeling, pipeline, training
from finetune.cli import TrainArguments


def main(args: TrainArguments):
    # 1. How the frozen base is stored and multiplied (QLoRA, Dettmers et al. 2023): weights in 4-bit NormalFloat,
    #    their scales quantized again, matmuls in bf16. --quantization picks 8bit (the tutorial's), fp8 or none.
    quantization = modeling.quantization_config(args.quantization, compute_dtype=modeling.compute_dtype(args.dtype),
                                                quant_type="nf4", double_quant=True)
    # 2. What trains: a rank-16 LoRA adapter (scale alpha / r = 2) on StarCoder's c_attn and c_proj layers.
    lora = modeling.lora_config(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                targets=args.lora_target_modules)
    # 3. Data tokenized, output directory claimed (or the run resumed), base loaded and quantized, LoRA added.
    run = pipeline.prepare(args, quantization, lora)
    # 4. Train: evaluate every --eval_steps, reload the best checkpoint's adapter at the end; on SIGTERM/SIGINT
    #    write a checkpoint and exit (rerun the command to resume).
    trainer = training.build_trainer(args, run)
    training.train(trainer, args, run)
    # 5. Save the adapter, compare it with the base on the held-out split, say where everything is.
    training.finish(trainer, args, run)
    return trainer


if __name__ == "__main__":
    cli.run(main, TrainArguments)
