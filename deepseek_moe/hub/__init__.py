"""Publish a model or LoRA adapter folder to the Hugging Face Hub (`deepseek-moe upload`, `hub_upload.py`).

`validate` (config, complete weights, plain index entries, loads as remote code without this package) → `staging`
(exactly the model's files: an allow-list, symlinked; generated files written fresh; the user's folder never written)
→ `card` (model card, no local paths) → `publish` (authenticate, byte-budgeted commits chained by `parent_commit`,
stale weights deleted in the last commit, unchanged files skipped so a re-run resumes).
"""

from .publish import commit_batches, upload
from .staging import Plan, stage
from .validate import HIDE_PACKAGE, UploadError

__all__ = ["HIDE_PACKAGE", "Plan", "UploadError", "commit_batches", "stage", "upload"]
