"""Write a StarCoder checkpoint of a given size with random weights, to run the scripts themselves (`--model DIR`)
on a GPU without a download. The architectures are finetune/architecture.py's table.

    python bench/starcoder_shapes.py --size 1b --save /tmp/starcoder-1b
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from finetune.architecture import SHAPES, starcoder_config  # noqa: E402


def save_random_checkpoint(size: str, directory: str) -> None:
    """An ordinary checkpoint directory (config, safetensors, tokenizer) of StarCoder's shape with random weights. The
    tokenizer is the embedded model's (4,096 tokens, a subset of the 49,152-row embedding)."""
    import torch
    from transformers import GPTBigCodeForCausalLM

    from finetune import modeling

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = GPTBigCodeForCausalLM(starcoder_config(size)).to(torch.bfloat16)
    model.save_pretrained(directory)
    modeling.load_tokenizer("tiny-starcoder").save_pretrained(directory)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1b", choices=list(SHAPES))
    parser.add_argument("--save", required=True, help="directory to write")
    options = parser.parse_args()
    save_random_checkpoint(options.size, options.save)
