"""The toolkit's shared code: one concern per module (see README.md, "How the code is laid out")."""

import logging
import warnings

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
