"""`deepseek-moe demo`: a small DeepSeek-V3-style model trained, balanced, decoded, saved, fine-tuned and exported on a
CPU in minutes, from data every machine has (the Python standard library's sources); `run.run_demo` does the work.

This module stays light (standard library only) because the caches must be pointed into the output directory
before torch, transformers, datasets or matplotlib are imported: they read these variables once, at import.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

CACHE_DIRECTORY = ".cache"
MARKER = ".deepseek-moe-demo"  # marks a directory the demo made, so that a re-run may reuse it


def keep_writes_inside(output_dir: str | os.PathLike) -> Path:
    """Point every cache and temporary directory the libraries use into `output_dir/.cache`, and turn off the Hub,
    so that the demo downloads nothing and writes nothing outside `output_dir`. Returns the cache directory."""
    cache = Path(output_dir).resolve() / CACHE_DIRECTORY
    locations = {
        "HF_HOME": cache / "huggingface",  # hub, datasets (packed rows) and transformers caches
        "HF_DATASETS_CACHE": cache / "huggingface" / "datasets",
        "MPLCONFIGDIR": cache / "matplotlib",  # font cache
        "XDG_CACHE_HOME": cache,
        "TRITON_CACHE_DIR": cache / "triton",
        "TORCHINDUCTOR_CACHE_DIR": cache / "torchinductor",
        "TMPDIR": cache / "tmp",
    }
    for name, path in locations.items():
        os.environ[name] = str(path)
    locations["TMPDIR"].mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = None  # re-read TMPDIR
    os.environ.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return cache


def prepare_output_dir(output_dir: str | os.PathLike) -> Path:
    """Create the output directory, or reuse it if it is empty or an earlier demo's (never someone else's files)."""
    path = Path(output_dir).resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output-dir {output_dir} is a file")
    if path.exists() and any(path.iterdir()) and not (path / MARKER).exists():
        raise ValueError(f"{output_dir} is not empty and not an earlier demo's output; choose another --output-dir")
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).touch()
    return path
