"""Part 1 — the base example: fine-tune StarCoder with a LoRA adapter on a quantized base (QLoRA).

    python base_example.py                                                 # StarCoder 15.5B on CodeAlpaca (GPU)
    python base_example.py --model tiny-starcoder --dataset stdlib-code   # the embedded demo, CPU, offline

Two configurations make the fine-tune: how the frozen base is stored (bitsandbytes' 4-bit NormalFloat) and what
trains on top of it (a LoRA adapter). Then: tokenize the data, load the quantized base, add LoRA, train with the
Hugging Face Trainer evaluating as it goes, and keep the best adapter.
"""

from finetune import cli
from finetune.cli import TrainArguments


def main(args: TrainArguments):
    # The libraries load once the arguments are valid, so --help and a mistyped flag answer at once.
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from finetune import modeling, pipeline, training

    # 1. How the frozen base is stored and multiplied (QLoRA, Dettmers et al. 2023): weights in 4-bit NormalFloat,
    #    their block scales quantized again (double quantization, ~0.4 bits a weight saved), matmuls in bf16.
    #    --quantization picks 8bit (LLM.int8, the tutorial's), fp8 (FP8 tensor cores) or none instead.
    if args.quantization == "4bit":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=modeling.compute_dtype(args.dtype))
    else:
        quantization = modeling.quantization_config(args.quantization, modeling.compute_dtype(args.dtype))
    # 2. What trains: a rank-16 LoRA adapter (scale alpha / r = 2) on the architecture's default layers (StarCoder's
    #    c_attn and c_proj; finetune/architecture.py), A random and B zero so training starts from the base model.
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=modeling.target_names(args.lora_target_modules), bias="none",
                      task_type="CAUSAL_LM")
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
