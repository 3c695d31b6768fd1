"""The Hub: the model card every finished output directory carries (README.md, with the metadata header PEFT and the
Trainer write, so an uploaded adapter shows its base, data and results), and the upload of the adapter folder."""

import importlib
import importlib.util
import os
from pathlib import Path

from .errors import UsageError
from .secrets import redact

CARD = "README.md"
# What an upload leaves out: the run's own bookkeeping, and the Trainer's pickled arguments (unsafe to load).
NOT_UPLOADED = ("wandb_run_id", "run_config.json", "training_args.bin")
# Hyperparameters the card lists, in this order.
SHOWN = ("quantization", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "seq_length", "packing",
         "batch_size", "gradient_accumulation_steps", "max_train_steps", "learning_rate", "lr_scheduler_type",
         "weight_decay", "fim_rate", "fim_spm_rate", "fim_loss", "seed", "recipe")


def _hub_id(name: str) -> bool:
    """A Hub id (namespace/name), not a local path or an embedded name."""
    return name.count("/") == 1 and not os.path.exists(name) and not name.startswith((".", "/", "~"))


def repository(args) -> str:
    return args.hub_model_id or Path(args.output_dir).absolute().name


def check(args) -> None:
    """Before training: an upload needs a token with write access (an upload that could only fail at the end of a
    run, hours in, is refused now)."""
    if not args.push_to_hub:
        return
    from huggingface_hub import get_token

    if not (args.hf_token or get_token()):
        raise UsageError("--push_to_hub needs a Hugging Face token with write access: set HF_TOKEN (or run hf auth "
                         "login), or leave out --push_to_hub")


def card(args, metrics: dict, hardware: str) -> str:
    """The model card: the Hub's metadata header (base_model, library_name: peft, tags, datasets, the held-out loss
    and HumanEval as model-index results) and a body with the base, the data, the hyperparameters, the results,
    throughput and hardware, and how to load the adapter. Local bases and data are named in the body only (the
    header's fields take Hub ids). No secret: the arguments shown are redacted."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    name, base = repository(args), args.model
    on_hub = _hub_id(base)
    data = [d for d in (args.dataset, args.eval_dataset) if d and _hub_id(d)]
    results = [EvalResult(task_type="text-generation", dataset_type=args.eval_dataset or args.dataset,
                          dataset_name=f"held-out {Path(args.eval_dataset or args.dataset).name}",
                          metric_type="loss", metric_name="held-out loss", metric_value=round(metrics["adapter_loss"],
                                                                                             4))]
    for key, dataset, title in (("humaneval_adapter_pass@1", "openai_humaneval", "HumanEval"),
                                ("humaneval_infilling_adapter_pass@1", "openai_humaneval",
                                 "HumanEval single-line infilling")):
        if key in metrics:
            results.append(EvalResult(task_type="text-generation", dataset_type=dataset, dataset_name=title,
                                      metric_type="pass@1", metric_name="pass@1", metric_value=round(metrics[key], 4)))
    header = ModelCardData(base_model=base if on_hub else None, library_name="peft", pipeline_tag="text-generation",
                           datasets=data or None, model_name=name, eval_results=results,
                           tags=[*([f"base_model:adapter:{base}"] if on_hub else []), "lora", "transformers",
                                 "starcoder-lora"])
    shown = redact({key: getattr(args, key) for key in SHOWN})
    lines = [f"# {name}", "",
             f"A LoRA adapter for {f'[{base}](https://huggingface.co/{base})' if on_hub else f'`{base}`'}, trained "
             f"with the starcoder-lora toolkit on {args.dataset} ({args.dataset_split} split).", "",
             "## Training", "", *(f"- `{key}`: {value}" for key, value in shown.items() if value not in (None, "")),
             f"- steps: {metrics['global_step']}", "",
             "## Results", "",
             f"Held-out loss over {metrics.get('held_out_examples', '?')} examples: base {metrics['base_loss']:.4f} "
             f"-> adapter {metrics['adapter_loss']:.4f} (perplexity {metrics['base_perplexity']:.4g} -> "
             f"{metrics['adapter_perplexity']:.4g})."]
    if "fim_examples" in metrics:
        lines += ["", f"Held-out fill-in-the-middle (a line of each of {metrics['fim_examples']} held-out files): "
                      f"loss base {metrics['fim_base_loss']:.4f} -> adapter {metrics['fim_adapter_loss']:.4f}; exact "
                      f"match base {metrics['fim_base_exact_match']:.1%} -> adapter "
                      f"{metrics['fim_adapter_exact_match']:.1%}."]
    for prefix, title in (("humaneval", "HumanEval"), ("humaneval_infilling", "HumanEval single-line infilling")):
        if f"{prefix}_adapter_pass@1" in metrics:
            lines += ["", f"{title} pass@1: base {metrics[f'{prefix}_base_pass@1']:.1%} -> adapter "
                          f"{metrics[f'{prefix}_adapter_pass@1']:.1%}."]
    if metrics.get("tokens_per_second"):
        lines += ["", "## Throughput", "", f"{metrics['tokens_per_second']:,.0f} tokens/s, "
                                           f"{metrics['model_tflops']:.3g} model TFLOP/s on {hardware}."]
    lines += ["", "## Use", "", "```python", "from peft import PeftModel", "from transformers import "
              "AutoModelForCausalLM, AutoTokenizer", "",
              f"base = AutoModelForCausalLM.from_pretrained({base!r})",
              f"model = PeftModel.from_pretrained(base, {name!r})",
              f"tokenizer = AutoTokenizer.from_pretrained({name!r})", "```", ""]
    return str(ModelCard(f"---\n{header.to_yaml()}\n---\n\n" + "\n".join(lines)))


def push(args, outputs: list[str]) -> None:
    """Upload the finished adapter folder's outputs (not checkpoints, W&B's folder or the run's bookkeeping). Without
    a network or the Hub's consent the adapter stays local: one line says so and how to upload it later."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    # a refused or unresolvable connection surfaces as the HTTP client's own error: httpx's under huggingface_hub 1,
    # httpx2's under 2 (hence both, where installed)
    transport = tuple(importlib.import_module(name).HTTPError for name in ("httpx", "httpx2")
                      if importlib.util.find_spec(name))
    repo_id, token = repository(args), args.hf_token or None
    patterns = [name for name in outputs if name not in NOT_UPLOADED]
    try:
        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=args.hub_private, exist_ok=True)
        api.upload_folder(folder_path=args.output_dir, repo_id=repo.repo_id, allow_patterns=patterns,
                          commit_message=f"Adapter trained with starcoder-lora ({repository(args)})")
    except (OSError, HfHubHTTPError, OfflineModeIsEnabled, *transport) as error:
        privacy = " --private" if args.hub_private else ""
        print(f"warning: the adapter was not uploaded ({str(error).splitlines()[0][:120]}); it stays in "
              f"{args.output_dir}. Upload it later with: hf upload {repo_id} {args.output_dir}{privacy} "
              f"--include {' --include '.join(patterns)}", flush=True)
        return
    print(f"uploaded to https://huggingface.co/{repo.repo_id}{' (private)' if args.hub_private else ''}", flush=True)
