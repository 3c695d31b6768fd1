"""StarCoder architectures by size, for benches that build models with random weights (no download).

15B: bigcode/starcoder config.json. 1B/3B/7B: the bigcode/starcoderbase-{1b,3b,7b} config.json files. All are
GPTBigCode with multi-query attention, learned positions and a 49,152-token vocabulary.
"""

from transformers import GPTBigCodeConfig

SHAPES = {  # (n_embd, n_layer, n_head)
    "15b": (6144, 40, 48),
    "7b": (4096, 42, 32),
    "3b": (2816, 36, 22),
    "1b": (2048, 24, 16),
    "tiny": (128, 2, 4),  # CPU test size
}


def starcoder_config(size: str) -> GPTBigCodeConfig:
    width, layers, heads = SHAPES[size]
    return GPTBigCodeConfig(vocab_size=49152, n_positions=8192, n_embd=width, n_layer=layers, n_head=heads,
                            n_inner=4 * width, multi_query=True, activation_function="gelu_pytorch_tanh",
                            bos_token_id=0, eos_token_id=0)


def save_random_checkpoint(size: str, directory: str) -> None:
    """An ordinary checkpoint directory (config, safetensors, tokenizer) of StarCoder's shape with random weights,
    for running the scripts themselves (`--model DIR`) on a GPU without a download. The tokenizer is the embedded
    model's (4,096 tokens, a subset of the 49,152-row embedding)."""
    import torch
    from transformers import GPTBigCodeForCausalLM

    from finetune import modeling

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = GPTBigCodeForCausalLM(starcoder_config(size)).to(torch.bfloat16)
    model.save_pretrained(directory)
    modeling.load_tokenizer("tiny-starcoder").save_pretrained(directory)


if __name__ == "__main__":
    import argparse
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser = argparse.ArgumentParser(description="Write a random-weight StarCoder checkpoint of a given size.")
    parser.add_argument("--size", default="1b", choices=list(SHAPES))
    parser.add_argument("--save", required=True, help="directory to write")
    options = parser.parse_args()
    save_random_checkpoint(options.size, options.save)
