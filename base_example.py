"""Part 1 — the base example: fine-tune StarCoder with a LoRA adapter on a quantized base (QLoRA).

    python base_example.py                                                 # StarCoder 15.5B on CodeAlpaca (GPU)
    python base_example.py --model tiny-starcoder --dataset stdlib-code   # the embedded demo, CPU, offline

The steps: load data and tokenize it; load the base model quantized by bitsandbytes; prepare it for k-bit training
and add LoRA (peft); train with the Hugging Face Trainer, evaluating as it goes; keep the best adapter.
"""

from transformers import set_seed

from finetune import checkpointing, cli, data, modeling, training
from finetune.cli import TrainArguments


def prepare(args: TrainArguments):
    """Everything before training: (tokenizer, LoRA-wrapped model, train set, eval set, checkpoint to resume from
    or None). Bad input stops here, before anything is written."""
    cli.check_positive(batch_size=args.batch_size, max_train_steps=args.max_train_steps, seq_length=args.seq_length)
    resume_from = checkpointing.resume_point(args)  # --resume auto: the newest complete checkpoint of this run
    token = args.hf_token or None  # else huggingface_hub reads $HF_TOKEN
    tokenizer = modeling.load_tokenizer(args.model, token)
    modeling.check_sequence_length(args.model, args.seq_length, token)
    texts = data.load_texts(args.dataset, args.prompt_column, args.completion_column, token)
    train_set, eval_set = data.split(texts, args.max_eval_samples, args.seed)
    train_set = data.tokenize(train_set, tokenizer, args.seq_length, args.packing)
    eval_set = data.tokenize(eval_set, tokenizer, args.seq_length)

    model = modeling.load_model(args.model, args.quantization, modeling.compute_dtype(args.dtype), token=token)
    set_seed(args.seed)  # LoRA's A matrices are drawn now, before the Trainer seeds: same seed, same run
    model = modeling.add_lora(model, args)
    model.print_trainable_parameters()
    return tokenizer, model, train_set, eval_set, resume_from


def main(args: TrainArguments):
    tokenizer, model, train_set, eval_set, resume_from = prepare(args)
    trainer = training.build_trainer(args, model, tokenizer, train_set, eval_set)
    # Evaluates every --eval_steps, reloads the best checkpoint's adapter at the end; resumes where a stopped run
    # left off; on SIGTERM/SIGINT writes a checkpoint and exits.
    training.train(trainer, args, resume_from)
    training.finish(trainer, args)
    return trainer


if __name__ == "__main__":
    cli.run(main, TrainArguments)
