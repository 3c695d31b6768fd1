"""One attention layer of StarCoder on packed blocks, forward + backward, in the kernels that could keep examples apart.

    python bench/attention_kernels.py --size 15b --batch 4 --seq_length 2048 --json attention.json   # a GPU

Examples of 80-600 tokens are packed into each block (as the packing code does), and each kernel computes causal
attention with one key/value head (multi-query): `sdpa_causal` lets every example see the ones before it in its
block (joining, no boundaries) with and without StarCoder's attention dropout of 0.1; the others keep examples
apart: `sdpa_document_mask` (a boolean mask per block), `flex_document` (torch.compile'd flex_attention with a
document-causal block mask, which skips fully masked tiles; the mask is built every step and included), and
`varlen` (FlashAttention's variable-length kernel on the flattened batch, where it exists in this torch).
"""

import importlib.util
import inspect
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from finetune import manifest  # noqa: E402
from bench import arguments  # noqa: E402
from bench.recipes import write_json  # noqa: E402
from bench.timing import milliseconds  # noqa: E402
from finetune.architecture import config as architecture_config  # noqa: E402


def document_ids(batch: int, seq_length: int, generator) -> torch.Tensor:
    """Per token, the index of its example within its block: examples of 80-600 tokens, wrapped across blocks."""
    ids = torch.empty(batch, seq_length, dtype=torch.int32)
    for row in range(batch):
        position, example = 0, 0
        while position < seq_length:
            length = int(torch.randint(80, 601, (1,), generator=generator))
            ids[row, position : position + length] = example
            position, example = position + length, example + 1
    return ids


def varlen_call(q, k, v, cu, longest):
    """torch.nn.attention.varlen.varlen_attn on (tokens, heads, dim), causal; its keywords changed across torch
    releases (is_causal, then window_size=(-1, 0))."""
    from torch.nn.attention.varlen import varlen_attn

    parameters = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in parameters else {"window_size": (-1, 0)}
    gqa = {"enable_gqa": True} if "enable_gqa" in parameters else {}
    return varlen_attn(q, k, v, cu, cu, longest, longest, **causal, **gqa)


def kernels(docs: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention)
    same_document = docs[:, None, :, None] == docs[:, None, None, :]
    causal = torch.ones(docs.shape[1], docs.shape[1], dtype=torch.bool, device=docs.device).tril()
    boolean_mask = same_document & causal

    def document_causal(b, h, q_idx, kv_idx):
        return (docs[b, q_idx] == docs[b, kv_idx]) & (q_idx >= kv_idx)

    def flex_document(q, k, v):
        block_mask = create_block_mask(document_causal, docs.shape[0], None, docs.shape[1], docs.shape[1],
                                       device=docs.device, _compile=True)
        return flex(q, k, v, block_mask=block_mask, enable_gqa=True)

    starts = torch.cat([torch.ones_like(docs[:, :1]), (docs[:, 1:] != docs[:, :-1]).int()], dim=1).flatten()
    boundaries = torch.nonzero(starts).flatten().int()
    cu = torch.cat([boundaries, torch.tensor([docs.numel()], device=docs.device, dtype=torch.int32)])
    longest = int((cu[1:] - cu[:-1]).max())

    def varlen(q, k, v):
        flat = [t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (q, k, v)]
        return varlen_call(*flat, cu, longest)

    found = {
        "sdpa_causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "sdpa_causal_dropout_0.1": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                  dropout_p=0.1, enable_gqa=True),
        "sdpa_document_mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=boolean_mask,
                                                                             enable_gqa=True),
        "flex_document": flex_document,
    }
    if importlib.util.find_spec("torch.nn.attention.varlen"):
        found["varlen"] = varlen
    return found


def main(options) -> dict:
    config = architecture_config("gpt_bigcode", options.size)
    heads, dim = config.n_head, config.n_embd // config.n_head
    generator = torch.Generator().manual_seed(0)
    docs = document_ids(options.batch, options.seq_length, generator).cuda()
    shape = (options.batch, options.seq_length)
    q = torch.randn(*shape[:1], heads, shape[1], dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(shape[0], 1, shape[1], dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    grad = torch.randn_like(q)
    results = {}
    for name, kernel in kernels(docs).items():
        try:
            out = kernel(q, k, v)
            grad_out = grad if out.shape == q.shape else grad.transpose(1, 2).reshape(out.shape)
            results[name] = milliseconds(lambda: kernel(q, k, v).backward(grad_out), repeats=20, warmup=5)
        except Exception as error:  # a kernel this torch lacks is a row of the table, not the end of the bench
            results[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        print(json.dumps({name: results[name]}), flush=True)
    header = manifest.provenance()
    examples = int(docs.max(dim=1).values.sum()) + options.batch
    print(f"\n{header['device']}, StarCoder-{options.size} attention ({heads} query heads, 1 kv head, dim {dim}), "
          f"{options.batch} x {options.seq_length} tokens, {examples} examples, forward + backward")
    for name, value in results.items():
        print(f"{name:26s} {value:8.3f} ms" if isinstance(value, float) else f"{name:26s} {value}")
    write_json(options.json, {**header, "size": options.size, "batch": options.batch,
                              "seq_length": options.seq_length, "examples": examples}, results)
    return results


if __name__ == "__main__":
    parser = arguments.parser(__doc__)
    parser.add_argument("--size", default="15b")
    parser.add_argument("--batch", type=arguments.at_least(1), default=4)
    parser.add_argument("--seq_length", type=arguments.at_least(2), default=2048)
    parser.add_argument("--json", type=arguments.output_file, default="")
    options = parser.parse_args()
    arguments.check_size(parser, "gpt_bigcode", options.size)
    main(options)
