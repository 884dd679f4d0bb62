"""DeepSeek mixture-of-experts models (DeepSeekMoE-16B, V2, V2-Lite, V3) for Hugging Face transformers.

`import deepseek_moe` registers the config and models with transformers' Auto classes (idempotently; the checkpoint
conversion mapping is registered by the modeling module itself, so remote code gets it too). The one exception is the
`deepseek-moe` command line, which starts without the model so that `--help` and light commands stay fast: its
commands register when they take a model class from `deepseek_moe.model` (see its `__init__`).
"""

import os
import sys


def _started_as_command_line() -> bool:
    """True while the console script (or `python -m deepseek_moe.cli`, `hub_upload.py`) imports the package."""
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    return program in ("deepseek-moe", "hub_upload.py", "-m") or program.startswith("deepseek-moe")


# Decided once, at the package's import: `python -m` later replaces argv[0] with the module's path.
_COMMAND_LINE = _started_as_command_line()
if not _COMMAND_LINE:
    from . import model  # noqa: F401  (registers the Auto classes)

_EXPORTS = {
    "DeepseekFp8Config",
    "DeepseekMoeConfig",
    "DeepseekMoeForCausalLM",
    "DeepseekMoeForSequenceClassification",
    "DeepseekMoeModel",
    "DeepseekMoePreTrainedModel",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        from . import model

        return getattr(model, name)
    if name == "PRESETS":
        from .presets import PRESETS

        return PRESETS
    raise AttributeError(f"module 'deepseek_moe' has no attribute {name!r}")


__all__ = sorted(_EXPORTS | {"PRESETS"})
