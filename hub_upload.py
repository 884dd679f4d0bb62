"""Publish a model or LoRA adapter folder to the Hugging Face Hub: the same as `deepseek-moe upload`.

python hub_upload.py MODEL_DIR REPO_ID [--private] [--revision R] [--create-pr] [--dry-run] [--include PATTERN]
    [--delete-stale] [--debug] ...
"""

import sys

from deepseek_moe.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["upload", *sys.argv[1:]]))
