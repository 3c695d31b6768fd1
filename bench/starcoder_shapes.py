"""Write a StarCoder or StarCoder2 checkpoint of a given size with random weights, to run the scripts themselves
(`--model DIR`) on a GPU without a download. The architectures are finetune/architecture.py's table.

    python bench/starcoder_shapes.py --size 1b --save /tmp/starcoder-1b
    python bench/starcoder_shapes.py --family starcoder2 --size 3b --save /tmp/starcoder2-3b
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import arguments  # noqa: E402
from finetune.architecture import config  # noqa: E402

TOKENIZERS = {"gpt_bigcode": "tiny-starcoder", "starcoder2": "tiny-starcoder2"}  # the family's special tokens


def save_random_checkpoint(family: str, size: str, directory: str) -> None:
    """An ordinary checkpoint directory (config, safetensors, tokenizer) of the family's shape with random weights.
    The tokenizer is the embedded tiny model's (4,096 tokens, a subset of the 49,152-row embedding)."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune import modeling

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config(family, size)).to(torch.bfloat16)
    model.save_pretrained(directory)
    modeling.load_tokenizer(TOKENIZERS[family]).save_pretrained(directory)


if __name__ == "__main__":
    parser = arguments.parser(__doc__)
    parser.add_argument("--family", default="gpt_bigcode", choices=list(TOKENIZERS))
    parser.add_argument("--size", default="1b")
    parser.add_argument("--save", type=arguments.output_dir, required=True, help="directory to write")
    options = parser.parse_args()
    arguments.check_size(parser, options.family, options.size)
    save_random_checkpoint(options.family, options.size, options.save)
