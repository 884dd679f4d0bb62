"""The model code: config, modeling, kernels and speculative decoding. Every other module in this folder is also the
Hub remote code of saved models (single-dot sibling imports only); this `__init__` is not, and registers the classes
with transformers' Auto classes and the static name tables Trainer reads, idempotently."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)
from transformers.models.auto import modeling_auto

from ..presets import from_preset
from .configuration_deepseek_moe import DeepseekMoeConfig
from .modeling_deepseek_moe import (
    DeepseekMoeForCausalLM,
    DeepseekMoeForSequenceClassification,
    DeepseekMoeModel,
    DeepseekMoePreTrainedModel,
)


def _register() -> None:
    model_type = DeepseekMoeConfig.model_type
    AutoConfig.register(model_type, DeepseekMoeConfig, exist_ok=True)
    AutoModel.register(DeepseekMoeConfig, DeepseekMoeModel, exist_ok=True)
    AutoModelForCausalLM.register(DeepseekMoeConfig, DeepseekMoeForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(DeepseekMoeConfig, DeepseekMoeForSequenceClassification, exist_ok=True)
    # Trainer and the label smoother recognise causal LMs by class name in these static tables.
    modeling_auto.MODEL_MAPPING_NAMES.setdefault(model_type, DeepseekMoeModel.__name__)
    modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(model_type, DeepseekMoeForCausalLM.__name__)
    modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.setdefault(
        model_type, DeepseekMoeForSequenceClassification.__name__
    )


# Presets live outside the remote code; the package binds them to the config class it ships.
DeepseekMoeConfig.from_preset = classmethod(from_preset)
_register()

__all__ = [
    "DeepseekMoeConfig",
    "DeepseekMoeForCausalLM",
    "DeepseekMoeForSequenceClassification",
    "DeepseekMoeModel",
    "DeepseekMoePreTrainedModel",
]
