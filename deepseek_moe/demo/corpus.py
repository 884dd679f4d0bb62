"""The demo's data, present on every machine: the Python standard library's own source files, split by file into
training and held-out sets, and a byte-level BPE tokenizer trained on the training files in seconds."""

from __future__ import annotations

import ast
import json
import sysconfig
import textwrap
import zlib
from dataclasses import dataclass
from pathlib import Path

# Test suites are large and full of unusual code, codecs and pydoc data are generated tables: the library proper
# is the corpus.
_SKIPPED_DIRECTORIES = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "encodings",
    "pydoc_data",
}
HELD_OUT_EVERY = 20  # one file in 20 is held out, chosen by a hash of its path

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|user|>", "<|assistant|>")
# A chat template in the style of DeepSeek's own: the user's turn, then the assistant's, ended by the EOS token.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}\n"
    "{% else %}{{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class SourceFile:
    """One standard-library file: its path relative to the library root and its text."""

    path: str
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _order_key(relative: str) -> tuple[int, str]:
    """A fixed pseudo-random order, so that any prefix of the file list mixes all parts of the library."""
    return zlib.crc32(relative.encode()), relative


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths of the library's `.py` files (tests and installed packages left out), in a deterministic
    order that does not depend on the file system's listing order."""
    root = stdlib_root() if root is None else root
    paths = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if _SKIPPED_DIRECTORIES.isdisjoint(relative.parts[:-1]):
            paths.append(relative.as_posix())
    if not paths:
        raise ValueError(f"no Python source files found under {root}")
    return sorted(paths, key=_order_key)


def is_held_out(relative: str) -> bool:
    return zlib.crc32(relative.encode()) % HELD_OUT_EVERY == 0


def read_split(max_bytes: int, held_out: bool, root: Path | None = None) -> list[SourceFile]:
    """Training or held-out files in the fixed order, up to about `max_bytes` of text (whole files)."""
    root = stdlib_root() if root is None else root
    files, total = [], 0
    for relative in stdlib_files(root):
        if is_held_out(relative) != held_out:
            continue
        text = (root / relative).read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        files.append(SourceFile(relative, text))
        total += len(text.encode())
        if total >= max_bytes:
            break
    return files


def write_jsonl(files: list[SourceFile], path: Path) -> None:
    """One `{"text", "path"}` record per file: the format `datasets` reads as a local JSON dataset."""
    write_jsonl_rows([{"text": source.text, "path": source.path} for source in files], path)


def write_jsonl_rows(rows: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as stream:
        for row in rows:
            stream.write(json.dumps(row) + "\n")


def train_tokenizer(files: list[SourceFile], vocab_size: int, output_dir: Path):
    """A byte-level BPE tokenizer (GPT-2/DeepSeek style: every byte is a token, so any text encodes) trained on
    `files`, saved to `output_dir` as a transformers `PreTrainedTokenizerFast` with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator((source.text for source in files), trainer=trainer)
    bos, eos, pad = SPECIAL_TOKENS[:3]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(output_dir)
    return tokenizer


def function_chats(files: list[SourceFile], max_chars: int) -> list[dict[str, list[dict[str, str]]]]:
    """Chat examples for instruction fine-tuning, taken from the code itself: the user asks for a function by its
    signature and the first line of its docstring, the assistant answers with the function's source (at most
    `max_chars` characters). Files that do not parse are skipped."""
    chats = []
    for source in files:
        try:
            tree = ast.parse(source.text)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or not (docstring := ast.get_docstring(node)):
                continue
            code = ast.get_source_segment(source.text, node)
            summary = docstring.strip().splitlines()[0]
            if code is None or len(code) > max_chars or not summary:
                continue
            code = textwrap.dedent(" " * node.col_offset + code)  # methods lose their class indentation
            request = f"Write a Python function `{node.name}({ast.unparse(node.args)})`: {summary}"
            chats.append({"messages": [{"role": "user", "content": request}, {"role": "assistant", "content": code}]})
    return chats
