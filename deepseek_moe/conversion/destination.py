"""Where a conversion writes, and what it may delete: only what it wrote itself.

- Paths are resolved (symlinks, `..`) before any check; the output may not be, contain or lie inside the source.
- An existing output is replaced only with `overwrite` and only when it is an earlier output of ours: its
  `conversion.json` lists every file it holds. Anything else in it is foreign, and the conversion refuses, naming it.
- One conversion at a time per output: an `flock` on `.NAME.convert-lock` beside it (released by the kernel when the
  process dies, even by SIGKILL).
- Work happens in `.NAME.converting-PID-XXXXXXXX` beside the output. Every shard, once closed, is entered with its
  size and CRC-32 in the directory's manifest, so an interrupted run (Ctrl-C, SIGTERM, SIGHUP, SIGKILL) can be
  resumed: the next run of the same conversion takes the directory over, once its owner process is gone, keeps the
  shards whose size and checksum still match, and writes only the others. CRC-32 (computed as the shard is written,
  at a third of sha256's cost) catches damage such as truncated or changed bytes; the directory is the user's own,
  so no forgery is guarded against.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

from ..remote_code import CONVERSION_RECORD
from .safetensors_io import ConversionError

# Inside a work directory only: the plan's fingerprint and the shards already complete.
MANIFEST = ".conversion-progress.json"
# Test hook: after this many shards are complete (in this run), sleep until killed, so a test can interrupt a
# conversion at a known point.
PAUSE_AFTER_SHARDS_ENV = "DEEPSEEK_MOE_TEST_PAUSE_AFTER_SHARDS"


class ConversionInterrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP during a conversion; the message says what was kept for a re-run to resume."""


def resolve_paths(source: str | Path, output: str | Path) -> tuple[Path, Path]:
    """Both paths with symlinks and `..` resolved, refusing an output that is, contains or lies inside the source."""
    source, output = Path(source).resolve(), Path(output).resolve()
    if output == source:
        raise ConversionError(f"{output} is the source checkpoint itself: choose another output directory")
    if source in output.parents:
        raise ConversionError(f"{output} lies inside the source {source}: choose an output outside it")
    if output in source.parents:
        raise ConversionError(f"{output} contains the source {source}: choose an output that does not hold it")
    return source, output


def recorded_files(directory: Path) -> set[str] | None:
    """Files an earlier conversion wrote into `directory`, from its record (None if it has no readable one)."""
    try:
        files = json.loads((directory / CONVERSION_RECORD).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(files, list) or not all(isinstance(name, str) and "/" not in name for name in files):
        return None
    return {*files, CONVERSION_RECORD}


def _contents(directory: Path) -> list[str]:
    """Every entry under `directory`, symlinked folders listed but not followed."""
    entries = []
    for root, folders, files in os.walk(directory):
        entries += [(Path(root) / name).relative_to(directory).as_posix() for name in folders + files]
    return sorted(entries)


def check_replaceable(output: Path, overwrite: bool) -> None:
    """An existing output may be replaced only when asked and only when everything in it is ours."""
    if not os.path.lexists(output):
        return
    if not output.is_dir():
        raise ConversionError(f"{output} exists and is not a directory: choose another output")
    contents = _contents(output)
    if not contents:
        return  # an empty directory: nothing to lose
    if not overwrite:
        raise ConversionError(f"{output} already exists; pass --overwrite (overwrite=True) to replace it")
    foreign = [name for name in contents if name not in (recorded_files(output) or set())]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConversionError(
            f"{output} holds files no conversion wrote ({shown}); --overwrite replaces only an earlier conversion's "
            "output: move them away or choose another output"
        )


def remove_written(directory: Path) -> None:
    """Delete an earlier output: the files its record lists, then the directory if that leaves it empty."""
    for name in recorded_files(directory) or set():
        (directory / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        directory.rmdir()


# ------------------------------------------------------------------------------------------------------ lock


@contextlib.contextmanager
def destination_lock(output: Path) -> Iterator[None]:
    """Hold `.NAME.convert-lock` beside `output` for the whole conversion; a second conversion into the same output
    fails at once with the first one's process id. POSIX only (`flock`): elsewhere (Windows) the conversion stops here
    with a clear error, while the rest of the package (loading, generating) still imports."""
    try:
        import fcntl
    except ImportError:
        raise ConversionError(
            "converting needs a POSIX system (Linux, macOS: its lock and resume use flock and process ids); "
            "run it there or under WSL"
        ) from None
    path = output.parent / f".{output.name}.convert-lock"
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 32).decode(errors="replace").strip() or "?"
            os.close(descriptor)
            raise ConversionError(
                f"another conversion into {output} is running (process {holder}): wait for it to finish or choose "
                "another output"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                break  # the file we locked is still the lock (its last holder may have unlinked it meanwhile)
        os.close(descriptor)
    os.ftruncate(descriptor, 0)
    os.write(descriptor, str(os.getpid()).encode())
    try:
        yield
    finally:
        os.unlink(path)
        os.close(descriptor)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (what `timeout`, Slurm, Docker and a closed terminal send) interrupt like Ctrl-C, so the
    same clean-up runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise ConversionInterrupted(signal.Signals(signum).name)

    numbers = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {number: signal.signal(number, interrupt) for number in numbers}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


# ------------------------------------------------------------------------------------------------ work directory

_WORK = re.compile(r"^\.(?P<name>.+)\.(?P<kind>converting|replaced)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _owner_gone(pid: int) -> bool:
    """The process that made a work directory is no longer running (this process counts as gone: it holds the lock,
    so an earlier call of its own left the directory)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def new_work_path(output: Path, kind: str = "converting") -> Path:
    return output.parent / f".{output.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as file:
        while block := file.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


class WorkDirectory:
    """The temporary directory a conversion fills, with its manifest of complete shards."""

    def __init__(self, path: Path, fingerprint: str, complete: dict[str, dict] | None = None) -> None:
        self.path, self.fingerprint, self.complete = path, fingerprint, complete or {}
        self.written_now = 0

    @classmethod
    def create(cls, output: Path, fingerprint: str) -> WorkDirectory:
        """Take over the resumable leftover of an earlier run of the same conversion whose owner is gone (removing
        other such leftovers), or start a new directory."""
        resumed = None
        for path in sorted(output.parent.iterdir()):
            match = _WORK.match(path.name)
            if not match or match["name"] != output.name or not _owner_gone(int(match["pid"])):
                continue
            if match["kind"] == "replaced":  # a previous output, its replacement interrupted before the deletion
                remove_written(path)
                continue
            candidate = cls._load(path)
            if resumed is None and candidate is not None and candidate.fingerprint == fingerprint:
                resumed = candidate
            else:
                shutil.rmtree(path, ignore_errors=True)
        path = new_work_path(output)
        if resumed is None:
            path.mkdir()
            work = cls(path, fingerprint)
        else:
            resumed.path.rename(path)
            work = cls(path, fingerprint, resumed.complete)
            work._keep_verified()
        work._save()
        return work

    @classmethod
    def _load(cls, path: Path) -> WorkDirectory | None:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            return cls(path, manifest["fingerprint"], dict(manifest["complete"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _keep_verified(self) -> None:
        """Keep the shards whose size and CRC-32 match the manifest; delete everything else in the directory."""
        kept = {}
        for name, entry in self.complete.items():
            path = self.path / name
            if path.is_file() and path.stat().st_size == entry["size"] and _crc32(path) == entry.get("crc32"):
                kept[name] = entry
        self.complete = kept
        self.discard_incomplete()

    def discard_incomplete(self) -> None:
        for path in self.path.iterdir():
            if path.name not in self.complete and path.name != MANIFEST:
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def _save(self) -> None:
        temporary = self.path / (MANIFEST + ".tmp")
        temporary.write_text(json.dumps({"fingerprint": self.fingerprint, "complete": self.complete}, indent=1))
        temporary.replace(self.path / MANIFEST)

    def shard_complete(self, name: str, size: int, crc32: int) -> None:
        """Called as each shard is closed; see `PAUSE_AFTER_SHARDS_ENV` for the test hook."""
        self.complete[name] = {"size": size, "crc32": crc32}
        self._save()
        self.written_now += 1
        pause_after = os.environ.get(PAUSE_AFTER_SHARDS_ENV)
        if pause_after and self.written_now >= int(pause_after):
            while True:
                time.sleep(60)

    def finish(self) -> None:
        (self.path / MANIFEST).unlink()

    @property
    def complete_bytes(self) -> int:
        return sum(entry["size"] for entry in self.complete.values())

    def keep_for_resume(self) -> bool:
        """Keep the complete shards for a re-run (the directory goes if there are none); returns whether any are."""
        self.discard_incomplete()
        if not self.complete:
            shutil.rmtree(self.path, ignore_errors=True)
        return bool(self.complete)

    def interrupted(self, reason: str, total: int) -> ConversionInterrupted:
        """Keep what a re-run can use; the error to raise says so."""
        if not self.keep_for_resume():
            return ConversionInterrupted(f"interrupted ({reason}); nothing was kept")
        return ConversionInterrupted(
            f"interrupted ({reason}); {len(self.complete)} of {total} files are complete in {self.path}: re-run the "
            "same command to resume"
        )


def move_into_place(work: Path, output: Path) -> None:
    """Rename the finished work directory to `output`, replacing an earlier output of ours (already checked by
    `check_replaceable`) so that one of the two is always complete at `output`."""
    if not os.path.lexists(output):
        work.rename(output)
        return
    if not any(output.iterdir()):
        output.rmdir()
        work.rename(output)
        return
    replaced = new_work_path(output, "replaced")
    output.rename(replaced)
    try:
        work.rename(output)
    except BaseException:
        replaced.rename(output)  # the old output stays where it was
        raise
    remove_written(replaced)
