"""Checkpoint layouts seen as one set of logical tensors under the official Hugging Face names.

- `hf`: `model.safetensors` or shards listed by `model.safetensors.index.json` (official DeepSeek repos and ours;
  FP8 weights carry a `<name>_scale_inv` companion).
- `mp`: DeepSeek's inference-repo model-parallel files `model{i}-mp{n}.safetensors` written by its `convert.py`:
  short names (`embed`, `layers.N.attn.wq_a`, `ffn.experts.E.w1`, `.scale`, `gate.bias`), routed experts split by
  rank, other weights sliced along a fixed dimension, MTP layers absent.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..model.architecture_deepseek_moe import FP8_BLOCK, DeepseekMoeArchitecture, mtp_copies
from .safetensors_io import ConversionError, TensorInfo, read_header

SCALE_SUFFIX = "_scale_inv"
INDEX_FILE = "model.safetensors.index.json"  # transformers' names for sharded and single-file weights
SINGLE_FILE = "model.safetensors"
_MP_FILE = re.compile(r"^model(\d+)-mp(\d+)\.safetensors$")

# DeepSeek-V3 `inference/convert.py`: official module name → (inference name, dimension sliced across ranks).
MP_NAMES: dict[str, tuple[str, int | None]] = {
    "embed_tokens": ("embed", 0),
    "input_layernorm": ("attn_norm", None),
    "post_attention_layernorm": ("ffn_norm", None),
    "q_proj": ("wq", 0),
    "q_a_proj": ("wq_a", None),
    "q_a_layernorm": ("q_norm", None),
    "q_b_proj": ("wq_b", 0),
    "kv_a_proj_with_mqa": ("wkv_a", None),
    "kv_a_layernorm": ("kv_norm", None),
    "kv_b_proj": ("wkv_b", 0),
    "o_proj": ("wo", 1),
    "gate": ("gate", None),
    "gate_proj": ("w1", 0),
    "down_proj": ("w2", 1),
    "up_proj": ("w3", 0),
    "norm": ("norm", None),
    "lm_head": ("head", 0),
}
_MP_MODULES = {short: official for official, (short, _) in MP_NAMES.items()}
_MP_RENAMES = {"self_attn": "attn", "mlp": "ffn"}
_MP_LEAVES = {"weight_scale_inv": "scale", "e_score_correction_bias": "bias"}


def is_scale(name: str) -> bool:
    return name.endswith(SCALE_SUFFIX)


def expert_index(name: str) -> int | None:
    """E in `...mlp.experts.E.*` (routed experts only)."""
    match = re.search(r"\.(?:mlp|ffn)\.experts\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def layer_index(name: str) -> int | None:
    match = re.match(r"(?:model\.)?layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def to_mp_name(name: str) -> tuple[str, int | None]:
    """Official name → (inference-repo name, slicing dimension or None), renamed as DeepSeek's `convert.py` does."""
    parts = name.removeprefix("model.").split(".")
    if len(parts) < 2 or parts[-2] not in MP_NAMES:
        raise ConversionError(f"{name}: has no counterpart in DeepSeek's inference (model-parallel) format")
    short, dim = MP_NAMES[parts[-2]]
    parts = [_MP_RENAMES.get(part, part) for part in parts[:-2]] + [short, _MP_LEAVES.get(parts[-1], parts[-1])]
    return ".".join(parts), dim


def from_mp_name(name: str) -> tuple[str, int | None]:
    """Inverse of `to_mp_name`."""
    parts = name.split(".")
    if len(parts) < 2 or parts[-2] not in _MP_MODULES:
        raise ConversionError(f"{name}: not a tensor name of DeepSeek's inference (model-parallel) format")
    official = _MP_MODULES[parts[-2]]
    leaves = {short: leaf for leaf, short in _MP_LEAVES.items()}
    modules = {short: module for module, short in _MP_RENAMES.items()}
    parts = [modules.get(part, part) for part in parts[:-2]] + [official, leaves.get(parts[-1], parts[-1])]
    prefix = "" if official == "lm_head" else "model."
    return prefix + ".".join(parts), MP_NAMES[official][1]


@dataclass(frozen=True)
class LogicalTensor:
    """A tensor under its official name: one stored tensor, or rank slices concatenated along `dim`."""

    parts: tuple[TensorInfo, ...]
    dim: int | None = None

    @property
    def dtype(self) -> str:
        return self.parts[0].dtype

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.parts[0].shape)
        if self.dim is not None:
            shape[self.dim] = sum(part.shape[self.dim] for part in self.parts)
        return tuple(shape)

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)

    @property
    def stored(self) -> TensorInfo | None:
        """The one stored tensor holding all of it (its bytes can be copied as they are), if there is one."""
        return self.parts[0] if len(self.parts) == 1 else None


@dataclass
class Checkpoint:
    """A checkpoint directory's tensors, planned from headers only."""

    directory: Path
    layout: str  # "hf" or "mp"
    tensors: dict[str, LogicalTensor]

    @classmethod
    def open(cls, directory: str | Path) -> Checkpoint:
        directory = Path(directory)
        if not directory.is_dir():
            raise ConversionError(f"{directory}: no such checkpoint directory")
        if (directory / INDEX_FILE).exists():
            return cls._open_sharded(directory)
        if (directory / SINGLE_FILE).exists():
            infos = read_header(directory / SINGLE_FILE)
            return cls(directory, "hf", {name: LogicalTensor((info,)) for name, info in infos.items()})
        if any(_MP_FILE.match(path.name) for path in directory.iterdir()):
            return cls._open_model_parallel(directory)
        raise ConversionError(
            f"{directory}: no checkpoint found (expected {SINGLE_FILE}, {INDEX_FILE} or model{{i}}-mp{{n}}.safetensors)"
        )

    @classmethod
    def _open_sharded(cls, directory: Path) -> Checkpoint:
        weight_map = read_index(directory / INDEX_FILE)
        shards = sorted(set(weight_map.values()))
        missing = [shard for shard in shards if not (directory / shard).is_file()]
        if missing:
            raise ConversionError(f"{directory}: shard {missing[0]} named in {INDEX_FILE} is missing")
        headers = {shard: read_header(directory / shard) for shard in shards}
        tensors = {}
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise ConversionError(f"{directory / shard}: tensor {name} named in {INDEX_FILE} is not in this shard")
            tensors[name] = LogicalTensor((headers[shard][name],))
        # Read shard by shard, in file order.
        tensors = dict(sorted(tensors.items(), key=lambda item: (item[1].parts[0].file, item[1].parts[0].offset)))
        return cls(directory, "hf", tensors)

    @classmethod
    def _open_model_parallel(cls, directory: Path) -> Checkpoint:
        ranks = {int(m.group(1)): int(m.group(2)) for p in directory.iterdir() if (m := _MP_FILE.match(p.name))}
        world = set(ranks.values())
        if len(world) != 1:
            raise ConversionError(f"{directory}: model-parallel files of different sizes mp{sorted(world)}")
        (mp,) = world
        missing = [f"model{i}-mp{mp}.safetensors" for i in range(mp) if i not in ranks]
        if missing:
            raise ConversionError(f"{directory}: model-parallel file {missing[0]} is missing")
        files = [directory / f"model{i}-mp{mp}.safetensors" for i in range(mp)]
        headers = [read_header(path) for path in files]
        tensors: dict[str, LogicalTensor] = {}
        for name, info in headers[0].items():
            if expert_index(name) is None:
                official, dim = from_mp_name(name)
                absent = [i for i, header in enumerate(headers) if name not in header]
                if absent:
                    raise ConversionError(f"{files[absent[0]]}: tensor {name} of rank 0 is missing")
                parts = tuple(header[name] for header in headers) if dim is not None else (info,)
                tensors[official] = LogicalTensor(parts, dim)
        for header in headers:
            for name, info in header.items():
                if expert_index(name) is not None:
                    tensors[from_mp_name(name)[0]] = LogicalTensor((info,))
        return cls(directory, "mp", tensors)


def read_index(path: Path) -> dict[str, str]:
    """The `weight_map` of a safetensors index: tensor name → shard, every shard a plain file name in the index's own
    folder (`../elsewhere/x`, `sub/x` or `/etc/passwd` would read or publish files from outside the checkpoint)."""
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ConversionError(f"{path}: not a safetensors index ({type(error).__name__}: {error})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConversionError(f"{path}: weight_map must map tensor names to shard file names")
    for shard in sorted(set(weight_map.values())):
        if shard in ("", ".", "..") or "/" in shard or "\\" in shard or "\0" in shard:
            raise ConversionError(
                f"{path}: shard {shard!r} is not a plain file name in the checkpoint's folder; an index may only name "
                "files beside it"
            )
    return weight_map


def scale_grid(shape: tuple[int, ...]) -> tuple[int, int]:
    """Shape of a 128×128-block `weight_scale_inv`: partial edge blocks count as whole ones."""
    return math.ceil(shape[0] / FP8_BLOCK), math.ceil(shape[1] / FP8_BLOCK)


def expected_shapes(config: DeepseekMoeArchitecture) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Shapes of every tensor the config's checkpoint must hold, exactly as `save_pretrained` writes them (official
    per-expert names, no tied head), and the names it may hold besides: the copies of the embedding and head in
    official MTP layers. Computed from the config alone, so conversion needs no model code; `tests/test_conversion.py`
    checks it against the meta-device model reverted by transformers' save-time conversion for every preset."""
    hidden, vocab = config.hidden_size, config.vocab_size
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    for index in range(config.num_hidden_layers + config.num_nextn_predict_layers):
        layer = f"model.layers.{index}."
        shapes[layer + "input_layernorm.weight"] = shapes[layer + "post_attention_layernorm.weight"] = (hidden,)
        shapes.update(_attention_shapes(config, layer + "self_attn."))
        if config.is_moe_layer(index) or index >= config.num_hidden_layers:
            shapes.update(_moe_shapes(config, layer + "mlp."))
        else:
            shapes.update(_mlp_shapes(hidden, config.intermediate_size, layer + "mlp."))
        if index >= config.num_hidden_layers:  # an MTP module
            for norm in ("enorm", "hnorm", "shared_head.norm"):
                shapes[f"{layer}{norm}.weight"] = (hidden,)
            shapes[layer + "eh_proj.weight"] = (hidden, 2 * hidden)
    copies = mtp_copies(config)
    shapes.update({copy: shapes["model.embed_tokens.weight"] for copy in copies})
    return shapes, set(copies)


def _linear(name: str, out_features: int, in_features: int, bias: bool = False) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (out_features, in_features), **({f"{name}.bias": (out_features,)} if bias else {})}


def _attention_shapes(config: DeepseekMoeArchitecture, prefix: str) -> dict[str, tuple[int, ...]]:
    """MLA (q-LoRA or plain `q_proj`, the joint `kv_a_proj_with_mqa`, `kv_b_proj`) or 16B's q/k/v/o."""
    hidden, heads, bias = config.hidden_size, config.num_attention_heads, config.attention_bias
    if not config.uses_mla:
        kv_width = config.num_key_value_heads * config.head_dim
        return {
            **_linear(prefix + "q_proj", heads * config.head_dim, hidden, bias),
            **_linear(prefix + "k_proj", kv_width, hidden, bias),
            **_linear(prefix + "v_proj", kv_width, hidden, bias),
            **_linear(prefix + "o_proj", hidden, heads * config.head_dim, bias),
        }
    qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    shapes = {}
    if config.q_lora_rank is None:
        shapes.update(_linear(prefix + "q_proj", heads * qk_head_dim, hidden))
    else:
        shapes.update(_linear(prefix + "q_a_proj", config.q_lora_rank, hidden, bias))
        shapes[prefix + "q_a_layernorm.weight"] = (config.q_lora_rank,)
        shapes.update(_linear(prefix + "q_b_proj", heads * qk_head_dim, config.q_lora_rank))
    shapes.update(_linear(prefix + "kv_a_proj_with_mqa", config.kv_lora_rank + config.qk_rope_head_dim, hidden, bias))
    shapes[prefix + "kv_a_layernorm.weight"] = (config.kv_lora_rank,)
    kv_b_rows = heads * (config.qk_nope_head_dim + config.v_head_dim)
    shapes.update(_linear(prefix + "kv_b_proj", kv_b_rows, config.kv_lora_rank))
    shapes.update(_linear(prefix + "o_proj", hidden, heads * config.v_head_dim, bias))
    return shapes


def _mlp_shapes(hidden: int, intermediate: int, prefix: str) -> dict[str, tuple[int, ...]]:
    return {
        **_linear(prefix + "gate_proj", intermediate, hidden),
        **_linear(prefix + "up_proj", intermediate, hidden),
        **_linear(prefix + "down_proj", hidden, intermediate),
    }


def _moe_shapes(config: DeepseekMoeArchitecture, prefix: str) -> dict[str, tuple[int, ...]]:
    """The router (with V3's correction bias), one SwiGLU per routed expert and the fused shared experts."""
    hidden, width = config.hidden_size, config.moe_intermediate_size
    shapes = {prefix + "gate.weight": (config.n_routed_experts, hidden)}
    if config.topk_method == "noaux_tc":
        shapes[prefix + "gate.e_score_correction_bias"] = (config.n_routed_experts,)
    for expert in range(config.n_routed_experts):
        shapes.update(_mlp_shapes(hidden, width, f"{prefix}experts.{expert}."))
    if config.n_shared_experts > 0:
        shapes.update(_mlp_shapes(hidden, width * config.n_shared_experts, prefix + "shared_experts."))
    return shapes
