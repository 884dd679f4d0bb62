"""The model card (README.md): Hub metadata (the "Use this model" snippets depend on `library_name` and
`pipeline_tag`), the architecture, how to load it, and the training and conversion history the folder carries, with
no local paths. A loss curve is drawn into the staging folder as a new file (never through a link)."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

from huggingface_hub import ModelCardData

from ..info import family, summary
from ..model.configuration_deepseek_moe import DeepseekMoeConfig
from .validate import read_json

TRAINER_STATE = "trainer_state.json"
TAGS = ["deepseek", "moe", "custom_code"]


def hub_id(name: str | None) -> str | None:
    """`name` if it looks like a Hub repository id rather than a local path."""
    if name and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not os.path.exists(name):
        return name
    return None


def publishable_record(record: dict) -> dict:
    """A conversion record without local paths: a `source` that is a path, not a Hub id, becomes its last component
    (records written before conversion stopped storing paths)."""
    source = record.get("source")
    if isinstance(source, str) and ("/" in source or os.sep in source) and not hub_id(source):
        return {**record, "source": Path(source).name}
    return record


def _license_metadata(license: str | None, config: DeepseekMoeConfig) -> dict[str, str]:
    """DeepSeek-V3 is MIT-licensed; the earlier models use DeepSeek's own model license."""
    if license:
        return {"license": license}
    if family(config) == "DeepSeek-V3":
        return {"license": "mit"}
    return {
        "license": "other",
        "license_name": "deepseek",
        "license_link": "https://github.com/deepseek-ai/DeepSeek-V2/blob/main/LICENSE-MODEL",
    }


def _architecture_table(config: DeepseekMoeConfig) -> str:
    return "| | |\n| --- | --- |\n" + "\n".join(f"| {label} | {value} |" for label, value in summary(config))


def _training_section(source: Path, staging: Path, images: dict[str, bytes]) -> str:
    """Loss curve from the folder's trainer state (an image, added to `images`, when matplotlib is installed, else a
    table) and the expert-load plots that are published."""
    lines = []
    state_path = source / TRAINER_STATE
    if state_path.is_file():
        state = read_json(state_path)
        losses = [(entry["step"], entry["loss"]) for entry in state.get("log_history", []) if "loss" in entry]
        lines.append(f"Trained for {state.get('global_step', '?')} steps ({state.get('epoch', '?')} epochs).\n")
        if losses:
            image = _loss_curve(losses)
            if image is None:
                shown = losses[:: max(1, len(losses) // 20)]
                lines.append(
                    "| step | training loss |\n| --- | --- |\n"
                    + "\n".join(f"| {step} | {loss:.4f} |" for step, loss in shown)
                )
            else:
                images["loss_curve.png"] = image
                lines.append("![training loss](loss_curve.png)")
    plots = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*.png") if "expert" in p.name.lower())
    if plots:
        lines.append("Expert load during training:\n")
        lines.extend(f"![{path}]({path})" for path in plots)
    return "\n".join(lines)


def _loss_curve(losses: list[tuple[int, float]]) -> bytes | None:
    """The loss curve as PNG bytes, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(*zip(*losses, strict=True))
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def model_card(
    source: Path,
    staging: Path,
    repo_id: str,
    config: DeepseekMoeConfig,
    base_model: str | None,
    license: str | None,
    record: dict | None,
) -> tuple[str, dict[str, bytes]]:
    """README.md for a model, and the images it shows that are drawn for it (name -> PNG bytes)."""
    metadata = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=base_model,
        tags=TAGS,
        **_license_metadata(license, config),
    )
    origin = f"Derived from [{base_model}](https://huggingface.co/{base_model}). " if base_model else ""
    attention_modules = (
        ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
        if config.uses_mla
        else ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    sections = [
        f"---\n{metadata.to_yaml()}\n---\n",
        f"# {repo_id.split('/')[-1]}\n",
        f"{origin}A {family(config)}-style mixture-of-experts model packaged with "
        "the `deepseek-moe` library: the model code ships in this repository as remote code, and "
        "the weights use DeepSeek's official per-expert layout.\n",
        "## Architecture\n",
        _architecture_table(config) + "\n",
        "## How to use\n",
        "With transformers >= 5.17 (the model code is downloaded from this repository):\n",
        "```python\nfrom transformers import AutoModelForCausalLM\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True, dtype="auto")\n```\n',
        "With `pip install deepseek-moe`, `import deepseek_moe` registers the same classes and "
        "`trust_remote_code` is not needed.\n",
        _tokenizer_section(staging, repo_id, base_model),
        "### Fine-tuning with PEFT\n",
        "```python\nfrom peft import LoraConfig, get_peft_model\n\n"
        f"model = get_peft_model(model, LoraConfig(r=16, target_modules={json.dumps(attention_modules)}))\n```\n",
        "### vLLM\n",
        "Not tested by this package. vLLM does not know the `deepseek_moe` model type; its transformers backend "
        f"runs the remote code: `vllm serve {repo_id} --trust-remote-code --model-impl transformers`.\n",
    ]
    images: dict[str, bytes] = {}
    training = _training_section(source, staging, images)
    if training:
        sections += ["## Training\n", training + "\n"]
    if record:
        shown = {key: value for key, value in record.items() if key != "files"}
        sections += ["## Conversion\n", "\n".join(f"- **{key}**: {value}" for key, value in shown.items()) + "\n"]
    return "\n".join(sections), images


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _tokenizer_section(staging: Path, repo_id: str, base_model: str | None) -> str:
    """How to prompt the model: with the tokenizer published beside it, or what to use where there is none."""
    if any((staging / name).exists() for name in TOKENIZER_FILES):
        return (
            "```python\nfrom transformers import AutoTokenizer\n\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
            'inputs = tokenizer("def fib(n):", return_tensors="pt")\n'
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))\n```\n"
        )
    source = f"the tokenizer of [{base_model}](https://huggingface.co/{base_model})" if base_model else "token ids"
    return f"This repository has no tokenizer: prompt it with {source}.\n"


def adapter_card(repo_id: str, adapter_config: dict, base_model: str, license: str | None) -> str:
    """README.md for a LoRA adapter: `library_name: peft` and `base_model` let the Hub link it to its base model."""
    metadata = ModelCardData(
        library_name="peft",
        pipeline_tag="text-generation",
        base_model=base_model,
        license=license,
        tags=["deepseek", "moe", "lora", f"base_model:adapter:{base_model}"],
    )
    targets = adapter_config.get("target_modules") or adapter_config.get("target_parameters")
    return "\n".join(
        [
            f"---\n{metadata.to_yaml()}\n---\n",
            f"# {repo_id.split('/')[-1]}\n",
            f"A {adapter_config.get('peft_type', 'LoRA')} adapter (rank {adapter_config.get('r', '?')}, targets "
            f"{targets}) for [{base_model}](https://huggingface.co/{base_model}).\n",
            "## How to use\n",
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base_model}", trust_remote_code=True, dtype="auto")\n'
            f'model = PeftModel.from_pretrained(base, "{repo_id}")\n```\n',
        ]
    )
