"""Shared code of the Qwen2.5 LoRA fine-tuning stages: config, template, records, data mixing, models, training,
evaluation, generation, chat and export."""

import logging

# bitsandbytes looks for an optional CPU 4-bit kernel on the hub at import and warns when it is not there; it
# falls back to its own kernel, so the warning is noise on every CPU run.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
