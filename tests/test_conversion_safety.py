"""`deepseek-moe convert` never loses data: the source is byte-identical after every scenario, nothing it did not
write is deleted, concurrent runs are refused, an interrupted run (SIGTERM, SIGKILL) resumes, and malformed or
hostile checkpoints (headers, index entries) get one-line errors naming the file."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import file_tree, tiny_model
from safetensors.torch import save_file

from deepseek_moe import DeepseekMoeConfig
from deepseek_moe.cli import main
from deepseek_moe.conversion import (
    Checkpoint,
    ConversionError,
    ConversionInterrupted,
    convert_checkpoint,
    plan_conversion,
)
from deepseek_moe.conversion import convert as convert_module
from deepseek_moe.conversion.destination import MANIFEST, PAUSE_AFTER_SHARDS_ENV, destination_lock
from deepseek_moe.conversion.safetensors_io import read_header

ROOT = Path(__file__).resolve().parents[1]
SHARDS = "60KB"  # tiny-v2-lite in fp32 is about 350 KB: several shards


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pristine") / "source"
    config = DeepseekMoeConfig.from_preset("tiny-v2-lite")
    tiny_model(config, seed=7).save_pretrained(directory, max_shard_size="100KB")
    (directory / "tokenizer.json").write_text("{}")
    return directory


@pytest.fixture
def work(checkpoint, tmp_path) -> Iterator[Path]:
    """`work/source` (a fresh copy of the checkpoint) beside the user's unrelated `work/notes.txt`; after every test
    both must be byte-identical to what they were."""
    shutil.copytree(checkpoint, tmp_path / "source")
    (tmp_path / "notes.txt").write_text("my notes\n")
    yield tmp_path
    assert file_tree(tmp_path / "source") == file_tree(checkpoint), "the source checkpoint changed"
    assert (tmp_path / "notes.txt").read_text() == "my notes\n"


ALIASES = {
    "dot-dot alias": (lambda w: w / "source" / ".." / "source", "is the source checkpoint itself"),
    "trailing dot": (lambda w: w / "source" / ".", "is the source checkpoint itself"),
    "parent": (lambda w: w, "contains the source"),
    "grandparent alias": (lambda w: w / "source" / ".." / ".." / w.name, "contains the source"),
    "inside": (lambda w: w / "source" / "converted", "lies inside the source"),
    "symlink to source": (lambda w: _link(w / "link", w / "source"), "is the source checkpoint itself"),
    "symlink to parent": (lambda w: _link(w / "up", w), "contains the source"),
}


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target, target_is_directory=True)
    return link


@pytest.mark.parametrize(("make_output", "message"), ALIASES.values(), ids=ALIASES.keys())
def test_outputs_that_alias_the_source_are_refused(work, capsys, make_output, message) -> None:
    before, notes = file_tree(work / "source"), (work / "notes.txt").read_bytes()
    output = make_output(work)
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(work / "source", output, overwrite=True, progress=False)
    assert main(["convert", str(work / "source"), str(output), "--overwrite", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert file_tree(work / "source") == before and (work / "notes.txt").read_bytes() == notes
    assert not [path.name for path in work.iterdir() if ".converting-" in path.name or "-lock" in path.name]


def test_overwrite_replaces_only_an_earlier_output_of_ours(work, capsys) -> None:
    source, output = work / "source", work / "out"
    before = file_tree(source)
    convert_checkpoint(source, output, progress=False)
    first = file_tree(output)
    record = json.loads((output / "conversion.json").read_text())
    assert set(record["files"]) | {"conversion.json"} == set(first)
    with pytest.raises(ConversionError, match="already exists; pass --overwrite"):
        convert_checkpoint(source, output, dtype="bf16", progress=False)
    convert_checkpoint(source, output, dtype="bf16", overwrite=True, progress=False)  # ours: replaced
    assert file_tree(output) != first and json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"

    (output / "eval.txt").write_text("results I wrote by hand\n")  # now not only ours
    (output / "plots").mkdir()
    (output / "plots" / "loss.png").write_bytes(b"png")
    replaced = file_tree(output)
    with pytest.raises(ConversionError, match=r"holds files no conversion wrote \(eval.txt, plots, plots/loss.png\)"):
        convert_checkpoint(source, output, overwrite=True, progress=False)
    assert file_tree(output) == replaced

    foreign = work / "elsewhere"  # a folder that was never a conversion's output
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"someone else's weights")
    assert main(["convert", str(source), str(foreign), "--overwrite", "--no-progress"]) == 2
    assert "holds files no conversion wrote (model.safetensors)" in capsys.readouterr().err
    assert (foreign / "model.safetensors").read_bytes() == b"someone else's weights"
    (work / "empty").mkdir()  # an empty directory holds nothing to lose
    convert_checkpoint(source, work / "empty", progress=False)
    assert file_tree(work / "empty") == first
    assert file_tree(source) == before and (work / "notes.txt").read_text() == "my notes\n"


def test_a_second_conversion_into_the_same_output_is_refused(work) -> None:
    with destination_lock((work / "out").resolve()):  # held as a running conversion holds it
        with pytest.raises(ConversionError, match=rf"another conversion into .*out is running \(process {os.getpid()}"):
            convert_checkpoint(work / "source", work / "out", progress=False)
    assert not (work / "out").exists()
    convert_checkpoint(work / "source", work / "out", progress=False)  # free again
    assert (work / "out" / "config.json").is_file() and not list(work.glob(".out.convert-lock"))


def test_leftovers_are_removed_only_when_their_owner_is_gone(work) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = work / f".out.converting-{int(finished.stdout)}-0123abcd"
    alive = work / f".out.converting-{os.getppid()}-4567cdef"
    for leftover in (dead, alive):
        leftover.mkdir()
        (leftover / "model-00001-of-00009.safetensors").write_bytes(b"partial")
    # A previous output moved aside by a replacement that was killed before deleting it: only its recorded files go.
    convert_checkpoint(work / "source", work / "previous", progress=False)
    replaced = work / f".out.replaced-{int(finished.stdout)}-89abcdef"
    (work / "previous").rename(replaced)
    (replaced / "added-later.txt").write_text("not written by a conversion")
    convert_checkpoint(work / "source", work / "out", progress=False)
    assert not dead.exists() and (alive / "model-00001-of-00009.safetensors").read_bytes() == b"partial"
    assert [path.name for path in replaced.iterdir()] == ["added-later.txt"]


@pytest.mark.parametrize("record", ["crc32", "sha256"])
def test_a_leftover_shard_is_kept_only_with_a_checksum_that_matches(work, record) -> None:
    """The re-run takes over a leftover of the same conversion and keeps a complete shard whose CRC-32 matches; a
    manifest that records shards another way (sha256, before CRC-32) gives nothing to check, so the shard is written
    again. Either way the output ends as an uninterrupted run's."""
    source = work / "source"
    reference = convert_checkpoint(source, work / "reference", max_shard_size=SHARDS, progress=False)
    plan = plan_conversion(source, max_shard_size=SHARDS)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = work / f".out.converting-{int(finished.stdout)}-0123abcd"
    leftover.mkdir()
    first = reference.files[0]
    data = (work / "reference" / first).read_bytes()
    (leftover / first).write_bytes(data)
    checksum = zlib.crc32(data) if record == "crc32" else hashlib.sha256(data).hexdigest()
    manifest = {
        "fingerprint": convert_module.plan_fingerprint(plan),
        "complete": {first: {"size": len(data), record: checksum}},
    }
    (leftover / MANIFEST).write_text(json.dumps(manifest))
    os.utime(leftover / first, ns=(1, 1))  # a kept file keeps this time
    convert_checkpoint(source, work / "out", max_shard_size=SHARDS, progress=False)
    assert file_tree(work / "out") == file_tree(work / "reference") and not leftover.exists()
    assert ((work / "out" / first).stat().st_mtime_ns == 1) == (record == "crc32")


def _ctrl_c() -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("interrupt", "reason"),
    [(_ctrl_c, "Ctrl-C"), (lambda: os.kill(os.getpid(), signal.SIGHUP), "SIGHUP")],
    ids=["Ctrl-C", "SIGHUP"],
)
def test_an_interruption_keeps_complete_shards_and_the_rerun_resumes(work, monkeypatch, interrupt, reason) -> None:
    source, output = work / "source", work / "out"
    reference = convert_checkpoint(source, work / "reference", max_shard_size=SHARDS, progress=False)
    assert len(reference.files) >= 4
    loads, interruptions = [], [40]
    real_step = convert_module._write_step  # reads one weight (copied or computed) and writes its outputs

    def interrupted(checkpoint, step, *args, **kwargs):
        loads.append(step.weight)
        if interruptions and len(loads) == interruptions[0]:
            interruptions.clear()
            interrupt()
        return real_step(checkpoint, step, *args, **kwargs)

    monkeypatch.setattr(convert_module, "_write_step", interrupted)
    message = rf"\({reason}\); \d+ of \d+ files are complete in .*re-run the same command to resume"
    with pytest.raises(ConversionInterrupted, match=message):
        convert_checkpoint(source, output, max_shard_size=SHARDS, progress=False)
    (leftover,) = work.glob(".out.converting-*")
    kept = {path.name for path in leftover.iterdir()} - {MANIFEST}
    assert kept and kept < set(reference.files) and not output.exists()
    # The resumed run needs disk space only for what it still writes; short of that it refuses and keeps the shards.
    kept_bytes = sum((leftover / name).stat().st_size for name in kept)
    needed = plan_conversion(source, max_shard_size=SHARDS).disk_bytes - kept_bytes
    for free in (needed - 1, needed):
        usage = SimpleNamespace(total=10**12, used=10**12, free=free)
        monkeypatch.setattr("shutil.disk_usage", lambda path, usage=usage: usage)
        if free < needed:
            with pytest.raises(ConversionError, match="not enough disk space"):
                convert_checkpoint(source, output, max_shard_size=SHARDS, progress=False)
            (leftover,) = work.glob(".out.converting-*")
            assert {path.name for path in leftover.iterdir()} - {MANIFEST} == kept
    loads.clear()
    convert_checkpoint(source, output, max_shard_size=SHARDS, progress=False)
    assert file_tree(output) == file_tree(work / "reference") and not list(work.glob(".out.converting-*"))
    assert set(loads) and not set(loads) & _tensors_in(output, kept)  # only the missing shards were read again


def _tensors_in(directory: Path, files: set[str]) -> set[str]:
    return {name for file in files for name in read_header(directory / file)}


def _wait_for_complete_shards(output: Path, process: subprocess.Popen) -> Path:
    """The child's work directory once its manifest lists a complete shard (the test hook then holds it there)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        for work in output.parent.glob(f".{output.name}.converting-{process.pid}-*"):
            try:
                if json.loads((work / MANIFEST).read_text())["complete"]:
                    return work
            except (OSError, ValueError):
                pass
        time.sleep(0.2)
    raise AssertionError("the child never completed a shard")


def test_killed_conversions_resume_with_only_the_missing_shards(work) -> None:
    """Two real `deepseek-moe convert` processes (started together to share the import time), each held after its
    first shard by the test hook, are killed, one by SIGTERM and one by SIGKILL; a second conversion into an output
    meanwhile is refused; each re-run keeps the complete shard (untouched, unless it was damaged) and ends
    byte-identical to an uninterrupted conversion."""
    source = work / "source"
    before = file_tree(source)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), PAUSE_AFTER_SHARDS_ENV: "1"}
    signals = {"SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "deepseek_moe.cli", "convert", str(source), str(work / name)]
            + ["--max-shard-size", SHARDS, "--no-progress"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in signals
    }
    try:
        reference = convert_checkpoint(source, work / "reference", max_shard_size=SHARDS, progress=False)
        leftovers = {name: _wait_for_complete_shards(work / name, process) for name, process in processes.items()}
        pid = processes["SIGTERM"].pid
        with pytest.raises(ConversionError, match=f"another conversion into .* is running \\(process {pid}"):
            convert_checkpoint(source, work / "SIGTERM", max_shard_size=SHARDS, progress=False)
        for name, process in processes.items():
            process.send_signal(signals[name])
        stderr = {name: process.communicate(timeout=60)[1] for name, process in processes.items()}
    finally:
        for process in processes.values():
            process.kill()
    assert processes["SIGTERM"].returncode == 130, stderr["SIGTERM"]
    assert stderr["SIGTERM"].strip().count("\n") == 0 and "interrupted (SIGTERM)" in stderr["SIGTERM"]
    assert "re-run the same command to resume" in stderr["SIGTERM"]
    assert processes["SIGKILL"].returncode == -signal.SIGKILL

    for name, leftover in leftovers.items():
        complete = json.loads((leftover / MANIFEST).read_text())["complete"]
        assert 1 <= len(complete) < len(reference.files)
        first = sorted(complete)[0]
        damaged = name == "SIGKILL"  # a damaged complete shard is caught by its checksum and rewritten
        if damaged:
            data = bytearray((leftover / first).read_bytes())
            data[-1] ^= 0xFF
            (leftover / first).write_bytes(data)
        os.utime(leftover / first, ns=(1, 1))  # a kept file keeps this time; a rewritten one gets the current time
        convert_checkpoint(source, work / name, max_shard_size=SHARDS, progress=False)
        assert file_tree(work / name) == file_tree(work / "reference")
        assert ((work / name / first).stat().st_mtime_ns == 1) != damaged
    assert not [path for path in work.iterdir() if path.name.startswith(".")] and file_tree(source) == before


WITHOUT_POSIX = """
import signal, sys
sys.modules["fcntl"] = None  # as on Windows: `import fcntl` raises ImportError
del signal.SIGHUP
import deepseek_moe.conversion, deepseek_moe.generate  # loading and generating still import
from deepseek_moe.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_flock_convert_says_so_and_the_rest_imports(work) -> None:
    """Where `fcntl` and SIGHUP do not exist (Windows), the package imports and `convert` stops with one line, before
    it writes anything."""
    completed = subprocess.run(
        [sys.executable, "-c", WITHOUT_POSIX, "convert", str(work / "source"), str(work / "out"), "--no-progress"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2, completed.stderr
    # (filelock, under huggingface_hub, warns that it falls back to a soft lock here; on Windows it has msvcrt)
    assert "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines()[-1] == (
        "deepseek-moe convert: error: converting needs a POSIX system (Linux, macOS: its lock and resume use flock "
        "and process ids); run it there or under WSL"
    )
    assert sorted(path.name for path in work.iterdir()) == ["notes.txt", "source"]


def _valid_file(directory: Path) -> Path:
    path = directory / "model.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)}, path)
    return path


def _with_header(path: Path, header: object, data: bytes = bytes(40), length: int | None = None) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


MALFORMED = {
    "empty": (lambda p: p.write_bytes(b""), "truncated"),
    "truncated length": (lambda p: p.write_bytes(b"\x10\x00"), "truncated"),
    "truncated header": (lambda p: p.write_bytes(p.read_bytes()[:20]), "header length"),
    "truncated data": (lambda p: p.write_bytes(p.read_bytes()[:-8]), "ends at byte"),
    "huge length": (lambda p: p.write_bytes(struct.pack("<Q", 2**63) + p.read_bytes()[8:]), "header length"),
    "not JSON": (lambda p: p.write_bytes(struct.pack("<Q", 8) + b"{not js}" + bytes(8)), "header is not JSON"),
    "JSON list": (lambda p: _with_header(p, [1, 2]), "header is not a JSON object"),
    "entry not an object": (lambda p: _with_header(p, {"a": 3}), "entry 'a' is not an object"),
    "unknown dtype": (
        lambda p: _with_header(p, {"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}),
        "unsupported dtype 'Q4'",
    ),
    "negative shape": (
        lambda p: _with_header(p, {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}),
        "invalid shape",
    ),
    "huge shape": (
        lambda p: _with_header(p, {"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}),
        "spans 4 bytes",
    ),
    "offsets outside the file": (
        lambda p: _with_header(p, {"a": {"dtype": "U8", "shape": [1000], "data_offsets": [0, 1000]}}),
        "ends at byte",
    ),
    "reversed offsets": (
        lambda p: _with_header(p, {"a": {"dtype": "U8", "shape": [0], "data_offsets": [8, 4]}}),
        "invalid data_offsets",
    ),
    "size mismatch": (
        lambda p: _with_header(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}),
        "spans 4 bytes, its shape [2] of F32 needs 8",
    ),
    "overlap": (
        lambda p: _with_header(
            p,
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            },
        ),
        "overlap",
    ),
}


@pytest.mark.parametrize(("damage", "message"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_headers_get_one_line_naming_the_file(tmp_path, capsys, damage, message) -> None:
    path = _valid_file(tmp_path)
    damage(path)
    with pytest.raises(ConversionError) as error:
        read_header(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)
    (tmp_path / "config.json").write_text(DeepseekMoeConfig.from_preset("tiny-v3").to_json_string())
    assert main(["convert", str(tmp_path), str(tmp_path / "out"), "--no-progress"]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_random_header_damage_never_escapes_as_another_error(tmp_path) -> None:
    """Seeded fuzzing: flipped header bytes and random lengths either still parse to a file-consistent header or give
    a ConversionError, never a TypeError, KeyError, MemoryError or OverflowError."""
    valid = _valid_file(tmp_path).read_bytes()
    (length,) = struct.unpack("<Q", valid[:8])
    generator, path, rejected = random.Random(0), tmp_path / "fuzzed.safetensors", 0
    for _ in range(400):
        data = bytearray(valid)
        for _ in range(generator.randint(1, 4)):
            data[generator.randrange(0, 8 + length)] = generator.randrange(256)
        path.write_bytes(bytes(data[: generator.choice([len(data), generator.randrange(len(data))])]))
        try:
            infos = read_header(path)
        except ConversionError as error:
            assert str(error).startswith(str(path))
            rejected += 1
            continue
        size = path.stat().st_size
        assert all(info.offset + info.nbytes <= size for info in infos.values())
    assert rejected > 200


@pytest.mark.parametrize("entry", ["../elsewhere/model.safetensors", "/etc/passwd", "sub/model.safetensors", ".."])
def test_index_entries_must_be_file_names_in_the_checkpoint(tmp_path, entry) -> None:
    (tmp_path / "elsewhere").mkdir()
    _valid_file(tmp_path / "elsewhere")
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    index = {"metadata": {}, "weight_map": {"a": entry}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=rf"shard {'.'}*.* is not a plain file name in the checkpoint's folder"):
        Checkpoint.open(checkpoint)


def test_debug_shows_the_traceback(tmp_path, capsys) -> None:
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    expected = f"deepseek-moe convert: error: {tmp_path / 'missing'}: no such checkpoint directory\n"
    assert capsys.readouterr().err == expected
    with pytest.raises(ConversionError, match="no such checkpoint directory"):
        main(["--debug", "convert", str(tmp_path / "missing"), str(tmp_path / "out")])
    with pytest.raises(ValueError, match="neither config.json"):  # after the command too, as hub_upload.py passes it
        main(["upload", str(tmp_path), "user/repo", "--dry-run", "--debug"])


def test_the_record_names_the_source_without_a_local_path(work) -> None:
    """A folder's name, or the Hub id of a Hugging Face cache snapshot; never the absolute path."""
    snapshot = work / "hub" / "models--deepseek-ai--DeepSeek-V2-Lite" / "snapshots" / "0123abc"
    shutil.copytree(work / "source", snapshot)
    for source, name in ((work / "source", "source"), (snapshot, "deepseek-ai/DeepSeek-V2-Lite")):
        convert_checkpoint(source, work / f"out-{source.name}", progress=False)
        text = (work / f"out-{source.name}" / "conversion.json").read_text()
        assert json.loads(text)["source"] == name and str(work) not in text
