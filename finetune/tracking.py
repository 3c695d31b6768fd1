"""W&B: online when credentials are set and the server answers, offline under --output_dir otherwise, one run per
output directory (a resumed run continues it), with every argument, the GPU and its peak in the run's config."""

import dataclasses
import glob
import netrc
import os
import random
import socket
import string
from pathlib import Path
from urllib.parse import urlparse

from .secrets import redact

SERVER_TIMEOUT_SECONDS = 5


def _credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _server_answers() -> bool:
    """A TCP connection to the W&B server within a few seconds: without one, wandb.init waits minutes, then fails."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=SERVER_TIMEOUT_SECONDS).close()
        return True
    except OSError:
        return False


def configure(args) -> None:
    """Point W&B at the output directory and choose how it logs, for this process and the ones it starts (a sweep's
    children): offline without credentials, or with one warning line when the server does not answer. The run id is
    kept in the output directory, so a resumed run continues the same W&B run."""
    if args.report_to != "wandb":
        return
    os.environ.setdefault("WANDB_PROJECT", args.wandb_project)
    os.environ.setdefault("WANDB_DIR", os.path.abspath(args.output_dir))
    os.environ.setdefault("WANDB_SILENT", "true")  # the end-of-run summary says where the run is
    if "WANDB_MODE" not in os.environ:
        if not _credentials():
            os.environ["WANDB_MODE"] = "offline"
        elif not _server_answers():
            print(f"warning: the W&B server does not answer; logging offline under {os.environ['WANDB_DIR']} "
                  f"(upload later with wandb sync)", flush=True)
            os.environ["WANDB_MODE"] = "offline"
    id_file = Path(args.output_dir) / "wandb_run_id"
    if int(os.environ.get("RANK", 0)) == 0 and not id_file.is_file():
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text("".join(random.SystemRandom().choices(string.ascii_lowercase + string.digits, k=8)))
    if id_file.is_file():  # set, not setdefault: a sweep's children must not inherit the parent's run
        os.environ["WANDB_RUN_ID"] = id_file.read_text().strip()
        os.environ["WANDB_RESUME"] = "allow"


def start_run(args, *more_arguments, job_type: str = "train") -> None:
    """Start this process's W&B run (the Trainer's W&B callback then logs into it) with the arguments, the GPU and
    its peak in its config, a job type and tags, so runs group and filter by recipe in the W&B UI."""
    if args.report_to != "wandb" or int(os.environ.get("RANK", 0)) != 0:
        return
    import torch
    import wandb  # only when W&B is in use

    from flops_counter import peak_tflops

    arguments = {}
    for values in (args, *more_arguments):
        arguments.update(redact(dataclasses.asdict(values)))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    job_type = os.environ.get("WANDB_JOB_TYPE", job_type)  # a sweep sets "sweep" for its children
    tags = [args.recipe or "custom", f"quantization:{args.quantization}", f"packing:{args.packing}", job_type]
    wandb.init(project=os.environ["WANDB_PROJECT"], dir=os.environ["WANDB_DIR"],
               name=os.path.basename(os.path.abspath(args.output_dir)), group=os.environ.get("WANDB_RUN_GROUP"),
               job_type=job_type, tags=tags,
               config={"arguments": arguments, "gpu": gpu, "gpu_count": max(torch.cuda.device_count(), 1),
                       "world_size": int(os.environ.get("WORLD_SIZE", 1)), "gpu_peak_bf16_tflops": peak_tflops(gpu),
                       "gpu_peak_fp8_tflops": peak_tflops(gpu, fp8=True)})


def end_run() -> str:
    """Close this process's W&B run and forget its settings, so a later run in this process (a test, a notebook, the
    sweep's summary) gets its own. Returns where the run is: its URL, or the command that uploads an offline one."""
    import wandb  # only when W&B is in use

    url = wandb.run.url if wandb.run is not None and os.environ.get("WANDB_MODE") != "offline" else None
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()
    if url:
        return f"W&B run: {url}"
    runs = sorted(glob.glob(os.path.join(os.environ.get("WANDB_DIR", "."), "wandb", "offline-run-*")))
    return f"W&B ran offline; upload with: wandb sync '{runs[-1]}'" if runs else "W&B logged nothing"
