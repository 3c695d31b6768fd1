"""StarCoder's architecture by size: one table for the embedded tiny model and for the benches' random-weight models.

15B: bigcode/starcoder config.json. 1B/3B/7B: the bigcode/starcoderbase-{1b,3b,7b} config.json files. All are
GPTBigCode with multi-query attention, gelu_pytorch_tanh, learned positions and a 49,152-token vocabulary.
"""

from transformers import GPTBigCodeConfig

SHAPES = {  # (n_embd, n_layer, n_head)
    "15b": (6144, 40, 48),
    "7b": (4096, 42, 32),
    "3b": (2816, 36, 22),
    "1b": (2048, 24, 16),
    "tiny": (128, 4, 4),  # the embedded `tiny-starcoder` and the CPU tests
}


def starcoder_config(size: str, **overrides) -> GPTBigCodeConfig:
    width, layers, heads = SHAPES[size]
    settings = dict(vocab_size=49152, n_positions=8192, n_embd=width, n_layer=layers, n_head=heads,
                    n_inner=4 * width, multi_query=True, activation_function="gelu_pytorch_tanh",
                    layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0)
    return GPTBigCodeConfig(**{**settings, **overrides})
