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
