"""Training data through `datasets`: local text / JSONL / JSON / CSV / parquet files or a saved dataset, tokenized and
packed into fixed-length rows.

A packed row is `input_ids` [S] and `position_ids` [S] where the positions restart at 0 at every document start. With
no 2D attention mask and no cache (`use_cache=False`, as in training), transformers' `create_causal_mask` reads those
resets as packed sequences and lets each token attend only to its own document; the model's MTP loss uses the same
resets so no prediction crosses a boundary, and `collate_packed` masks the label of every document's first token, so
the LM loss never predicts across one either.
Rows are filled completely (documents longer than a row continue in the next row as a new segment; the tokens left
after the last full row are dropped), so packed rows carry no padding.

    documents = load_documents(["corpus.jsonl"])
    rows = pack_dataset(documents, tokenizer, seq_length=4096)
    batch = collate_packed([rows[0], rows[1]])  # input_ids, position_ids, labels
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

# File suffix -> `datasets` builder.
BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
IGNORE_INDEX = -100
# A plain chat format for the byte tokenizer: each turn "<|role|>\ncontent</s>".
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists()
    )


def resolve_data_files(paths: Sequence[str | os.PathLike]) -> tuple[str, list[str]]:
    """The `datasets` builder and the files for `paths` (files, or directories whose files share one suffix).

    Raises FileNotFoundError for a missing path and ValueError for unknown or mixed suffixes, before anything loads.
    """
    if not paths:
        raise ValueError("no data files given")
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data file not found: {raw}")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
            if not found:
                raise FileNotFoundError(f"no data files ({', '.join(sorted(BUILDERS))}) in directory {raw}")
            files.extend(found)
        else:
            files.append(path)
    builders = {BUILDERS.get(p.suffix.lower()) for p in files}
    if None in builders:
        unknown = sorted({p.suffix or p.name for p in files if p.suffix.lower() not in BUILDERS})
        raise ValueError(f"unsupported data file type {unknown}; expected one of {sorted(BUILDERS)} or a saved dataset")
    if len(builders) > 1:
        raise ValueError(f"data files mix formats {sorted(builders)}; give files of one format")
    return builders.pop(), [str(p) for p in files]


def check_data_paths(paths: Sequence[str | os.PathLike]) -> None:
    """Raise FileNotFoundError / ValueError now for data `load_documents` could not read (nothing is loaded)."""
    if not (len(paths) == 1 and _is_saved_dataset(Path(paths[0]).expanduser())):
        resolve_data_files(paths)


def load_documents(
    paths: Sequence[str | os.PathLike],
    *,
    streaming: bool = False,
    text_sample_by: str = "paragraph",
    split: str = "train",
):
    """A `datasets.Dataset` (or `IterableDataset` when `streaming`) of documents from local files or one saved dataset
    directory (`Dataset.save_to_disk`). Plain text files give one document per `text_sample_by` unit: "line",
    "paragraph" (blank-line separated, default) or "document" (the whole file)."""
    import datasets

    if len(paths) == 1 and _is_saved_dataset(Path(paths[0]).expanduser()):
        loaded = datasets.load_from_disk(str(Path(paths[0]).expanduser()))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"saved dataset {paths[0]} has no split {split!r}; it has {sorted(loaded)}")
            loaded = loaded[split]
        return loaded.to_iterable_dataset() if streaming else loaded
    builder, files = resolve_data_files(paths)
    if builder != "text":
        return datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=streaming)
    documents = datasets.load_dataset(
        "text", data_files={split: files}, split=split, streaming=streaming, sample_by=text_sample_by
    )
    # Paragraphs and files keep their trailing newlines; a document ends at its text (EOS follows).
    return documents.map(lambda row: {"text": row["text"].strip()})


def tokenize_documents(
    documents, tokenizer, text_field: str = "text", add_eos: bool = True, num_proc: int | None = None
):
    """Map `text_field` to `input_ids` (with the tokenizer's special tokens, then EOS when `add_eos` and the tokenizer
    did not add one), dropping every other column and empty documents."""
    columns = documents.column_names
    if columns is not None and text_field not in columns:
        raise ValueError(f"the data has no {text_field!r} column (columns: {columns}); set the text field")
    eos = tokenizer.eos_token_id if add_eos else None

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch[text_field], add_special_tokens=True)["input_ids"]
        if eos is not None:
            ids = [row + [eos] if not row or row[-1] != eos else row for row in ids]
        return {"input_ids": ids}

    options = {"num_proc": num_proc} if num_proc and not _is_iterable(documents) else {}
    tokenized = documents.map(tokenize, batched=True, remove_columns=columns, **options)
    return tokenized.filter(lambda row: len(row["input_ids"]) > 1)


def _is_iterable(dataset) -> bool:
    import datasets

    return isinstance(dataset, datasets.IterableDataset)


def pack_token_rows(documents: Iterable[Sequence[int]], seq_length: int) -> Iterator[dict[str, list[int]]]:
    """Greedy packing: concatenate documents into rows of exactly `seq_length` tokens, with `position_ids`
    restarting at 0 at each document start and at each row start (a document cut by a row boundary continues as a
    new segment). Tokens after the last full row are dropped."""
    ids: list[int] = []
    positions: list[int] = []
    for document in documents:
        start = 0
        while start < len(document):
            take = min(seq_length - len(ids), len(document) - start)
            ids.extend(document[start : start + take])
            positions.extend(range(take))
            start += take
            if len(ids) == seq_length:
                yield {"input_ids": ids, "position_ids": positions}
                ids, positions = [], []


def pack_dataset(documents, tokenizer, seq_length: int, text_field: str = "text", num_proc: int | None = None):
    """Tokenized, packed rows (`input_ids`, `position_ids`) of a document dataset. A map-style dataset gives a
    map-style dataset (written once to the `datasets` cache); a streaming one gives a streaming one."""
    import datasets

    tokenized = tokenize_documents(documents, tokenizer, text_field, num_proc=num_proc)

    def rows() -> Iterator[dict[str, list[int]]]:
        return pack_token_rows((row["input_ids"] for row in tokenized), seq_length)

    column = datasets.Sequence(datasets.Value("int32"))
    features = datasets.Features({"input_ids": column, "position_ids": column})
    if _is_iterable(tokenized):
        return datasets.IterableDataset.from_generator(rows, features=features)
    total = sum(len(ids) for ids in tokenized["input_ids"])
    if total < seq_length:
        raise ValueError(f"the data has {total} tokens, fewer than one row of --seq-length {seq_length}")
    # Cached under the tokenized data's fingerprint: the same files, tokenizer and length reuse the packed rows.
    packed = datasets.Dataset.from_generator(
        rows, features=features, fingerprint=f"{tokenized._fingerprint}-pack{seq_length}"
    )
    return packed.with_format("torch")


def document_start_labels(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Labels for packed rows: the input ids, with IGNORE_INDEX where a document starts (position 0), so the
    causal-LM shift never asks a document's last token to predict the next document's first."""
    return input_ids.masked_fill(position_ids == 0, IGNORE_INDEX)


def collate_packed(rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack packed rows into `input_ids`, `position_ids` and `labels` [B, S] (int64). No attention mask: the
    position resets carry the document boundaries."""
    input_ids = torch.stack([torch.as_tensor(row["input_ids"], dtype=torch.long) for row in rows])
    position_ids = torch.stack([torch.as_tensor(row["position_ids"], dtype=torch.long) for row in rows])
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "labels": document_start_labels(input_ids, position_ids),
    }


def byte_tokenizer(model_max_length: int = 1 << 30):
    """A byte-level tokenizer needing no download: ids 0-255 are the bytes, then `<s>` (256), `</s>` (257) and
    `<pad>` (258), with a plain chat template. Fits every preset's vocabulary (the tiny ones have 512), so the tiny
    presets train and fine-tune on any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_unicode = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps each byte to one printable character; sort them by byte value so that id == byte.
    ordered = sorted(byte_to_unicode, key=lambda char: _byte_of(char))
    vocab = {char: index for index, char in enumerate(ordered)}
    for index, token in enumerate(("<s>", "</s>", "<pad>"), start=256):
        vocab[token] = index
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=model_max_length,
        chat_template=BYTE_CHAT_TEMPLATE,
    )


def _byte_of(char: str) -> int:
    """The byte GPT-2's ByteLevel alphabet maps to `char` (printable bytes map to themselves, others to 256 + n)."""
    code = ord(char)
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
