"""What differs per model architecture, in one table: the families the toolkit fine-tunes, the layers LoRA adapts in
each by default (and why), and their published shapes, for the embedded tiny models and the benches' random-weight
models.

Shapes: bigcode/starcoder and bigcode/starcoderbase-{1b,3b,7b}, bigcode/starcoder2-{3b,7b,15b} config.json. Code
Llama and DeepSeek-Coder are Llama-architecture models, Qwen2.5-Coder a Qwen2 one; those run from their own Hub
config and have only a tiny shape here, for the tests.
"""

from dataclasses import dataclass

from transformers import GPTBigCodeConfig, LlamaConfig, Qwen2Config, Starcoder2Config

# bigcode-project/starcoder2's finetune.py adapts q, k, v, o and gate, up, down: Llama's layer names, of which only
# the attention projections exist in StarCoder2 (its MLP is c_fc/c_proj), so what it trains is q, k, v, o. On Llama
# and Qwen2 the same list is every linear layer, as QLoRA (Dettmers et al. 2023, section 4) found LoRA needs to
# match full fine-tuning.
_BIGCODE_STARCODER2_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    description: str  # what users know it as
    config_class: type
    lora_targets: tuple[str, ...]  # the default --lora_target_modules
    common: dict  # config.json values that all sizes share
    sizes: dict[str, dict]  # per size: the values that differ; `tiny` is the embedded model's and the CPU tests'


FAMILIES = {
    "gpt_bigcode": Family(
        "StarCoder, StarCoderBase, SantaCoder (GPTBigCode: multi-query attention, learned positions)",
        GPTBigCodeConfig,
        # c_attn (fused q, k, v) and c_proj (attention output and MLP down-projection). The tutorial's `q_attn`
        # exists only for GPTBigCode cross-attention, so it matches nothing in StarCoder.
        ("c_attn", "c_proj"),
        dict(vocab_size=49152, n_positions=8192, multi_query=True, activation_function="gelu_pytorch_tanh",
             layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0),
        {"15b": dict(n_embd=6144, n_layer=40, n_head=48, n_inner=24576),
         "7b": dict(n_embd=4096, n_layer=42, n_head=32, n_inner=16384),
         "3b": dict(n_embd=2816, n_layer=36, n_head=22, n_inner=11264),
         "1b": dict(n_embd=2048, n_layer=24, n_head=16, n_inner=8192),
         "tiny": dict(n_embd=128, n_layer=4, n_head=4, n_inner=512)}),
    "starcoder2": Family(
        "StarCoder2 (grouped-query attention, rotary positions, a 4,096-token sliding window)",
        Starcoder2Config,
        _BIGCODE_STARCODER2_TARGETS[:4],
        dict(vocab_size=49152, max_position_embeddings=16384, sliding_window=4096, use_bias=True, norm_epsilon=1e-5,
             hidden_act="gelu_pytorch_tanh", attention_dropout=0.1, residual_dropout=0.1, embedding_dropout=0.1,
             bos_token_id=0, eos_token_id=0),
        {"15b": dict(hidden_size=6144, intermediate_size=24576, num_hidden_layers=40, num_attention_heads=48,
                     num_key_value_heads=4, rope_theta=100000),
         "7b": dict(hidden_size=4608, intermediate_size=18432, num_hidden_layers=32, num_attention_heads=36,
                    num_key_value_heads=4, rope_theta=1000000),
         "3b": dict(hidden_size=3072, intermediate_size=12288, num_hidden_layers=30, num_attention_heads=24,
                    num_key_value_heads=2, rope_theta=999999.4420358813),
         "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2)}),
    "llama": Family(
        "Code Llama, DeepSeek-Coder (Llama: grouped-query attention, rotary positions, SwiGLU)",
        LlamaConfig,
        _BIGCODE_STARCODER2_TARGETS,
        dict(hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=16384, bos_token_id=1, eos_token_id=2),
        {"tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2)}),
    "qwen2": Family(
        "Qwen2.5-Coder (Qwen2: grouped-query attention with q/k/v biases, rotary positions, SwiGLU)",
        Qwen2Config,
        _BIGCODE_STARCODER2_TARGETS,
        dict(hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True),
        {"tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2)}),
}


def config(model_type: str, size: str, **overrides):
    """A transformers config of `model_type` (a FAMILIES key) at one of its sizes, with `overrides` on top."""
    family = FAMILIES[model_type]
    return family.config_class(**{**family.common, **family.sizes[size], **overrides})


def lora_targets(model_type: str) -> tuple[str, ...] | None:
    family = FAMILIES.get(model_type)
    return family.lora_targets if family else None
