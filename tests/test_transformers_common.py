"""transformers' own common model tests (ModelTesterMixin, TrainingTesterMixin, ConfigTester) on our classes.

The mixins come from the transformers sdist of the installed version (`scripts/fetch_transformers_tests.py`, run by
`scripts/test.sh`, and by this module when they are missing); `GenerationTesterMixin` is not in the sdist (our own
generation tests cover generate), but the mixins' tests that iterate over `all_generative_model_classes` (e.g.
`test_moe_models_record_router_logits`) run here."""

from __future__ import annotations

import subprocess
import sys
import unittest
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "transformers-tests" / transformers.__version__
if not (CACHE / "hftests" / "test_modeling_common.py").exists():
    # Fetched here too, so that a plain `pytest` runs them rather than skipping; a failed fetch fails collection.
    subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_transformers_tests.py")], check=True, timeout=600)
sys.path.insert(0, str(CACHE))

from hftests.test_configuration_common import ConfigTester  # noqa: E402
from hftests.test_modeling_common import ModelTesterMixin, ids_tensor  # noqa: E402
from hftests.test_training_mixin import TrainingTesterMixin  # noqa: E402

from deepseek_moe import (  # noqa: E402
    DeepseekMoeConfig,
    DeepseekMoeForCausalLM,
    DeepseekMoeForSequenceClassification,
    DeepseekMoeModel,
)


class DeepseekMoeModelTester:
    """What the mixins ask of a model tester: a small V3-style config (MLA with q-LoRA, sigmoid noaux_tc routing over
    groups, shared expert, a dense first layer) and inputs."""

    def __init__(self, parent: unittest.TestCase, batch_size: int = 2, seq_length: int = 7) -> None:
        self.parent = parent
        self.batch_size, self.seq_length = batch_size, seq_length
        self.is_training = True
        self.vocab_size, self.hidden_size = 99, 32
        self.num_hidden_layers, self.num_attention_heads = 2, 4
        self.base_model_class = DeepseekMoeModel
        self.causal_lm_class = DeepseekMoeForCausalLM
        self.sequence_classification_class = DeepseekMoeForSequenceClassification

    def get_config(self) -> DeepseekMoeConfig:
        return DeepseekMoeConfig.from_preset(
            "tiny-v3",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_nextn_predict_layers=0,
            pad_token_id=0,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )

    def prepare_config_and_inputs_for_common(self) -> tuple[DeepseekMoeConfig, dict]:
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        return self.get_config(), {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


class DeepseekMoeCommonTest(ModelTesterMixin, TrainingTesterMixin, unittest.TestCase):
    all_model_classes = (DeepseekMoeModel, DeepseekMoeForCausalLM, DeepseekMoeForSequenceClassification)
    all_generative_model_classes = (DeepseekMoeForCausalLM,)  # GenerationTesterMixin itself is not in the sdist
    test_all_params_have_gradient = False  # experts no token picked get no gradient

    def setUp(self) -> None:
        self.model_tester = DeepseekMoeModelTester(self)
        self.config_tester = ConfigTester(self, config_class=DeepseekMoeConfig, hidden_size=32)

    def test_config(self) -> None:
        self.config_tester.run_common_tests()

    @unittest.skip(
        "asks for GenerationTesterMixin, which the sdist does not ship (scripts/fetch_transformers_tests.py stubs it "
        "empty); generate is tested by tests/test_generation.py and tests/test_mtp.py"
    )
    def test_generation_tester_mixin_inheritance(self) -> None:
        pass
