"""DeepSeek mixture-of-experts models (DeepSeekMoE-16B, V2, V2-Lite, V3) for Hugging Face transformers.

Importing the package registers the config and models with transformers' Auto classes (idempotently); the
checkpoint conversion mapping is registered by the modeling module itself, so remote code gets it too.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)
from transformers.models.auto import modeling_auto

from .configuration_deepseek_moe import PRESETS, DeepseekMoeConfig
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


_register()

__all__ = [
    "PRESETS",
    "DeepseekMoeConfig",
    "DeepseekMoeForCausalLM",
    "DeepseekMoeForSequenceClassification",
    "DeepseekMoeModel",
    "DeepseekMoePreTrainedModel",
]
