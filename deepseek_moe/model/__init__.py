"""The model code: config, modeling, kernels and speculative decoding. Every other module in this folder is also the
Hub remote code of saved models (single-dot sibling imports only); this `__init__` is not, and registers the classes
with transformers' Auto classes and the static name tables Trainer reads, idempotently.

While the `deepseek-moe` command line starts, registration (and with it the modeling code, transformers' model
machinery and triton) waits until a model class is first asked for, so commands that need only the config (`convert`,
`info`) import what they use: `deepseek_moe.model.configuration_deepseek_moe` stays light."""

from .. import _COMMAND_LINE
from ..presets import from_preset
from .configuration_deepseek_moe import DeepseekMoeConfig
from .quantization_deepseek_moe import DeepseekFp8Config

_MODEL_CLASSES = (
    "DeepseekMoeForCausalLM",
    "DeepseekMoeForSequenceClassification",
    "DeepseekMoeModel",
    "DeepseekMoePreTrainedModel",
)


def register() -> None:
    """Import the modeling code and register it with transformers' Auto classes and Trainer's name tables."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.models.auto import modeling_auto

    from . import modeling_deepseek_moe as modeling

    model_type = DeepseekMoeConfig.model_type
    AutoConfig.register(model_type, DeepseekMoeConfig, exist_ok=True)
    AutoModel.register(DeepseekMoeConfig, modeling.DeepseekMoeModel, exist_ok=True)
    AutoModelForCausalLM.register(DeepseekMoeConfig, modeling.DeepseekMoeForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(
        DeepseekMoeConfig, modeling.DeepseekMoeForSequenceClassification, exist_ok=True
    )
    # Trainer and the label smoother recognise causal LMs by class name in these static tables.
    modeling_auto.MODEL_MAPPING_NAMES.setdefault(model_type, "DeepseekMoeModel")
    modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(model_type, "DeepseekMoeForCausalLM")
    modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.setdefault(
        model_type, "DeepseekMoeForSequenceClassification"
    )
    # Plain attributes from now on: `__getattr__` (and so this function) runs only until the first registration.
    globals().update({name: getattr(modeling, name) for name in _MODEL_CLASSES})


def __getattr__(name: str):
    if name in _MODEL_CLASSES:
        register()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Presets live outside the remote code; the package binds them to the config class it ships.
DeepseekMoeConfig.from_preset = classmethod(from_preset)
if not _COMMAND_LINE:
    register()

__all__ = ["DeepseekFp8Config", "DeepseekMoeConfig", *_MODEL_CLASSES]
