"""W&B: online when credentials are set and the server answers, offline under --output_dir otherwise (also when it
stops answering while the run starts), one run per output directory (a resumed run continues it), with every
argument, the GPU and its peak in the run's config."""

import dataclasses
import glob
import netrc
import os
import random
import re
import string
import urllib.error
import urllib.request
from pathlib import Path

from . import files
from .errors import UsageError
from .secrets import redact

SERVER_TIMEOUT_SECONDS = 5
INIT_TIMEOUT_SECONDS = 60  # wandb.init's own deadline, should the server stop answering after the first check
ID_FILE = "wandb_run_id"
RUN_ID = re.compile(r"[a-z0-9]{1,64}")


def _credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _server_answers() -> bool:
    """An HTTP answer (any status) from the W&B server within a few seconds. Without one wandb.init waits minutes and
    fails; a server that accepts the connection and never answers is caught here too."""
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/") + "/healthz"
    try:
        urllib.request.urlopen(url, timeout=SERVER_TIMEOUT_SECONDS).close()
        return True
    except urllib.error.HTTPError:  # it answered, with an error status: it is there
        return True
    except (OSError, ValueError):  # refused, unreachable, timed out, or no such host
        return False


def _offline(why: str) -> None:
    print(f"warning: {why}; logging offline under {os.environ['WANDB_DIR']} (upload later with wandb sync)",
          flush=True)
    os.environ["WANDB_MODE"] = "offline"


def choose_mode(args) -> None:
    """Point W&B at the output directory and choose how it logs, for this process and the ones it starts (a sweep's
    children), before anything is written: offline without credentials (refused when WANDB_MODE=online asks for
    online), or with one warning line when the server does not answer."""
    if args.report_to != "wandb":
        return
    os.environ.setdefault("WANDB_PROJECT", args.wandb_project)
    os.environ.setdefault("WANDB_DIR", os.path.abspath(args.output_dir))
    os.environ.setdefault("WANDB_SILENT", "true")  # the end-of-run summary says where the run is
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "disabled", "dryrun"):
        return
    if not _credentials():
        if mode:
            raise UsageError("WANDB_MODE=online needs a W&B API key: set WANDB_API_KEY (or run wandb login), or "
                             "unset WANDB_MODE to log offline")
        os.environ["WANDB_MODE"] = "offline"
    elif not _server_answers():
        _offline(f"the W&B server ({os.environ.get('WANDB_BASE_URL', 'https://api.wandb.ai')}) does not answer "
                 f"within {SERVER_TIMEOUT_SECONDS} s")


def configure(args) -> None:
    """Keep the run's W&B id in the output directory (once the directory is this run's), so a resumed run continues
    the same W&B run. A damaged id file gives a new W&B run, with one warning."""
    if args.report_to != "wandb":
        return
    id_file = Path(args.output_dir) / ID_FILE
    files.refuse_link(id_file, "the run's W&B id")
    if id_file.exists() and not id_file.is_file():
        raise UsageError(f"{id_file} is not a file (the toolkit keeps the run's W&B id there): remove it")
    run_id = id_file.read_text(errors="replace").strip() if id_file.is_file() else None
    if run_id is not None and not RUN_ID.fullmatch(run_id):
        print(f"warning: {id_file} does not hold a W&B run id ({run_id[:40]!r}); this run logs to a new W&B run",
              flush=True)
        run_id = None
    if run_id is None and int(os.environ.get("RANK", 0)) == 0:
        run_id = "".join(random.SystemRandom().choices(string.ascii_lowercase + string.digits, k=8))
        id_file.parent.mkdir(parents=True, exist_ok=True)
        files.write_atomically(id_file, run_id)
    if run_id:  # set, not setdefault: a sweep's children must not inherit the parent's run
        os.environ["WANDB_RUN_ID"] = run_id
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
    run = dict(project=os.environ["WANDB_PROJECT"], dir=os.environ["WANDB_DIR"],
               name=os.path.basename(os.path.abspath(args.output_dir)), group=os.environ.get("WANDB_RUN_GROUP"),
               job_type=job_type, tags=tags,
               config={"arguments": arguments, "gpu": gpu, "gpu_count": max(torch.cuda.device_count(), 1),
                       "world_size": int(os.environ.get("WORLD_SIZE", 1)), "gpu_peak_bf16_tflops": peak_tflops(gpu),
                       "gpu_peak_fp8_tflops": peak_tflops(gpu, fp8=True)})
    try:
        wandb.init(**run, settings=wandb.Settings(init_timeout=INIT_TIMEOUT_SECONDS))
    except wandb.errors.Error as error:  # a server that answered the check and then stopped answering
        if os.environ.get("WANDB_MODE") == "offline":
            raise
        _offline(f"W&B could not start an online run ({str(error).splitlines()[0][:100]})")
        wandb.teardown()
        wandb.init(**run, mode="offline")


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
