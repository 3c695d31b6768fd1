"""Three FLOP counts per token for a StarCoder or StarCoder2 model with LoRA (on its default targets): the Trainer's
`total_flos`, our model FLOPs, and our hardware FLOPs under activation checkpointing. Pure arithmetic on a model built
on the meta device: runs anywhere.

    python bench/count_flops.py --size 15b --seq_length 2048 --lora_r 16
    python bench/count_flops.py --family starcoder2 --size 15b --seq_length 16384   # the 4,096-token window counts
"""

import json
import os
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import arguments  # noqa: E402
from finetune import architecture, modeling  # noqa: E402
from finetune.files import write_atomically  # noqa: E402
from flops_counter import flops_per_token  # noqa: E402


def count(family: str, size: str, seq_length: int, lora_r: int) -> dict:
    config = architecture.config(family, size)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    hf_total_flos = 6 * model.num_parameters(exclude_embeddings=True)  # Trainer.floating_point_ops, per token
    targets = modeling.lora_targets(config, None)
    model = get_peft_model(model, LoraConfig(r=lora_r, target_modules=targets, task_type="CAUSAL_LM"))
    plain = flops_per_token(model, seq_length)
    # Reentrant checkpointing with a frozen base makes the embeddings' output require grad (peft does this).
    model.enable_input_require_grads()
    checkpointed = flops_per_token(model, seq_length, gradient_checkpointing=True)
    return {"family": family, "size": size, "seq_length": seq_length, "lora_r": lora_r, "lora_targets": targets,
            "hf_total_flos_per_token": hf_total_flos, "model_flops_per_token": plain.model,
            "hardware_flops_per_token_checkpointing": checkpointed.hardware, "breakdown": plain.breakdown}


if __name__ == "__main__":
    parser = arguments.parser(__doc__)
    parser.add_argument("--family", default="gpt_bigcode", choices=list(architecture.FAMILIES))
    parser.add_argument("--size", default="15b")
    parser.add_argument("--seq_length", type=arguments.at_least(2), default=2048)
    parser.add_argument("--lora_r", type=arguments.at_least(1), default=16)
    parser.add_argument("--json", type=arguments.output_file, default="", help="also write the result here")
    options = parser.parse_args()
    arguments.check_size(parser, options.family, options.size)
    result = count(options.family, options.size, options.seq_length, options.lora_r)
    model = result["model_flops_per_token"]
    print(f"{options.family}-{options.size}, LoRA r={options.lora_r} on {'+'.join(result['lora_targets'])}, seq "
          f"{options.seq_length}: GFLOPs per token")
    for name in ("hf_total_flos_per_token", "model_flops_per_token", "hardware_flops_per_token_checkpointing"):
        print(f"  {name:42s} {result[name] / 1e9:8.1f}  ({result[name] / model:.2f}x model)")
    for name, value in result["breakdown"].items():
        print(f"    {name:40s} {value / 1e9:8.1f}")
    if options.json:
        write_atomically(Path(options.json), json.dumps(result, indent=1))
