"""The toolkit's shared code: one concern per module (see README.md, "How the code is laid out")."""

import logging
import os
import warnings

# CUDA's caching allocator keeps the segments it first made, at their sizes. A layer's weights unpacked and freed in
# every layer fragment them: StarCoder-15B's lean_fp8 with every layer checkpointed could not find the loss's 384 MiB
# under an 11.5 GiB cap (11.94 GiB in use, the CUDA context included), and with expandable segments (one growing
# mapping) it ran, peaking at 11.0 GiB (H100, 2026-12-07, docs/PERFORMANCE.md). torchtitan sets the same. A setting
# of the user's own wins. PyTorch reads it when CUDA first allocates, so setting it at import is early enough.
if not (os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")):
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

# bitsandbytes 0.50 tries, at import, to fetch an optional CPU kernel from the Hugging Face Hub through the `kernels`
# package, and logs a warning when it cannot; it then uses its own kernel. Nothing for a user to act on.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# peft 0.21 reads `is_gradient_checkpointing`, which transformers 5.2x deprecated, whenever it wraps or loads an
# adapter: not ours to act on (peft's next release reads the new name).
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
# The Trainer warns when a resumed run logs or evaluates at other intervals than its checkpoint's: the toolkit lets a
# resumed run change those (finetune/checkpointing.py, RESUMABLE_CHANGES), so the warning would only alarm.
logging.getLogger("transformers.trainer").addFilter(
    lambda record: not record.getMessage().startswith("The following arguments do not match"))
