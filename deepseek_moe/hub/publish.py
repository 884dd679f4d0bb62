"""Sending a staged folder: authenticate first, then commits of at most `--max-commit-size` chained by
`parent_commit` (weights first; config, index, adapter config and card last, together with the deletion of remote
files that would change what loads, so the repository only looks complete, and only loads the new model, once it
is). A re-run skips files already on the Hub with the same content, so an interrupted upload resumes; network
failures become one-line errors that say so."""

from __future__ import annotations

import fnmatch
import tempfile
from pathlib import Path

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils.sha import git_hash, sha_fileobj
from transformers.utils.hub import convert_file_size_to_int

from ..conversion.layouts import INDEX_FILE
from .staging import Plan, stage
from .validate import UploadError

# The files that make a repository loadable and carded; committed last so it only looks complete once it is.
FINAL_FILES = ("config.json", INDEX_FILE, "adapter_config.json", "README.md")
# Remote files at the root that change what loads when they stay beside a new upload: other weights and indexes (a
# stale `model.safetensors` wins over a new index), pickled weights, model code, an adapter config.
LOADING_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.gguf",
    "*.msgpack",
    "*.h5",
    "*.py",
    "adapter_config.json",
)
KEPT_ALWAYS = (".gitattributes",)
NETWORK_ERRORS = (HfHubHTTPError, httpx2.HTTPError, OSError)


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"[:300]


def authenticate(token: str | None) -> HfApi:
    """Fail before any work with a clear message when there is no token or the Hub rejects it."""
    token = token or get_token()
    if not token:
        raise UploadError("no Hugging Face token: pass --token, set HF_TOKEN or run `hf auth login`")
    api = HfApi(token=token)
    try:
        user = api.whoami()
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code == 401:
            raise UploadError(f"the token was rejected by {api.endpoint} (401 on whoami)") from None
        raise UploadError(f"{api.endpoint} did not answer whoami ({_one_line(error)}): re-run when it does") from None
    except NETWORK_ERRORS as error:
        raise UploadError(f"cannot reach {api.endpoint} ({_one_line(error)}): check the network and re-run") from None
    print(f"authenticated as {user['name']} on {api.endpoint}")
    return api


def stale_files(remote: dict[str, RepoFile], files: dict[str, int], delete_stale: bool) -> list[str]:
    """Remote files the upload does not contain that would change what loads (all of them with `delete_stale`)."""
    stale = []
    for path in sorted(remote.keys() - files.keys()):
        if path in KEPT_ALWAYS:
            continue
        if delete_stale or ("/" not in path and any(fnmatch.fnmatchcase(path, p) for p in LOADING_FILES)):
            stale.append(path)
    return stale


def remote_files(api: HfApi, repo_id: str, revision: str | None) -> dict[str, RepoFile] | None:
    """The repository's files at `revision`, or None when it (or the branch) does not exist yet."""
    try:
        entries = api.list_repo_tree(repo_id, revision=revision, recursive=True)
        return {entry.path: entry for entry in entries if isinstance(entry, RepoFile)}
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return None


def commit_batches(files: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Group files into commits of at most `max_bytes` (a larger file gets its own). Weights go first and the files
    that make a repository loadable (`FINAL_FILES`) together in the last commit, so an interrupted upload never leaves
    a config or index pointing at shards that are not there yet."""
    final = sorted(path for path in files if path in FINAL_FILES)
    rest = sorted(
        (path for path in files if path not in FINAL_FILES), key=lambda p: (not p.endswith(".safetensors"), p)
    )
    batches: list[list[str]] = []
    size = 0
    for path in rest:
        if not batches or size + files[path] > max_bytes:
            batches.append([])
            size = 0
        batches[-1].append(path)
        size += files[path]
    if final and batches and size + sum(files[path] for path in final) <= max_bytes:
        batches[-1] += final
    elif final:
        batches.append(final)
    return batches


def unchanged_on_hub(remote: dict[str, RepoFile], staging: Path, files: dict[str, int]) -> set[str]:
    """Files whose content is already in `remote` (git blob sha1 for regular files, sha256 for LFS), so a re-run
    after an interruption only uploads what is missing."""
    same = set()
    for path, size in files.items():
        entry = remote.get(path)
        if entry is None or entry.size != size:
            continue
        if entry.lfs is not None:
            with open(staging / path, "rb") as file:
                matches = sha_fileobj(file).hex() == entry.lfs.sha256
        else:
            matches = git_hash((staging / path).read_bytes()) == entry.blob_id
        if matches:
            same.add(path)
    return same


def publish(
    api: HfApi,
    staging: Path,
    plan: Plan,
    repo_id: str,
    private: bool | None,
    revision: str | None,
    create_pr: bool,
    commit_message: str,
    max_commit_bytes: int,
    delete_stale: bool,
) -> str:
    """Upload the staged files in commits chained by `parent_commit`; returns the URL to show the user."""
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and not revision.startswith("refs/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    head = api.repo_info(repo_id, revision=revision).sha
    remote = remote_files(api, repo_id, head) or {}
    unchanged = unchanged_on_hub(remote, staging, plan.files)
    deletions = stale_files(remote, plan.files, delete_stale)
    todo = {path: size for path, size in plan.files.items() if path not in unchanged}
    if len(todo) < len(plan.files):
        print(f"{len(plan.files) - len(todo)} of {len(plan.files)} files are already on the Hub unchanged: skipped")
    if deletions:
        print(f"deleting {len(deletions)} remote file(s) the upload replaces (last commit): {', '.join(deletions)}")
    if not todo and not deletions:
        print("nothing to upload: every file is already on the Hub")
        return str(repo_url)
    batches = commit_batches(todo, max_commit_bytes) or [[]]
    target, parent, pr_url = revision, head, None
    for number, batch in enumerate(batches, 1):
        message = commit_message if len(batches) == 1 else f"{commit_message} (part {number}/{len(batches)})"
        operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(staging / path)) for path in batch]
        if number == len(batches):
            operations += [CommitOperationDelete(path_in_repo=path) for path in deletions]
        try:
            info = api.create_commit(
                repo_id,
                operations,
                commit_message=message,
                revision=target,
                create_pr=create_pr and number == 1,
                parent_commit=parent,
            )
        except HfHubHTTPError as error:
            if error.response is not None and error.response.status_code == 412:
                raise UploadError(
                    f"{target or 'main'} moved during the upload (someone else committed): re-run the same command "
                    "to resume"
                ) from None
            raise
        if create_pr and number == 1:  # later parts go to the pull request's ref
            target, pr_url = info.pr_revision, info.pr_url
        parent = info.oid
        sent = sum(todo[p] for p in batch)
        print(f"commit {number}/{len(batches)}: {len(batch)} file(s), {sent:,} bytes: {info.oid}")
    return pr_url or info.commit_url


def _grouped(paths: list[str]) -> list[str]:
    """Paths at the root as they are, the rest as their top folder with a file count."""
    folders: dict[str, int] = {}
    shown = []
    for path in paths:
        top, slash, _ = path.partition("/")
        if slash:
            folders[top] = folders.get(top, 0) + 1
        else:
            shown.append(path)
    return shown + [f"{folder}/ ({count} files)" for folder, count in sorted(folders.items())]


def print_plan(plan: Plan, repo_id: str, max_commit_bytes: int, deletions: list[str] | None) -> None:
    print(f"{plan.kind} folder validated; upload plan for {repo_id}:")
    width = max(len(path) for path in plan.files)
    for path, size in sorted(plan.files.items()):
        print(f"  {path:<{width}}  {size:>15,} bytes")
    batches = commit_batches(plan.files, max_commit_bytes)
    print(f"{len(plan.files)} files, {sum(plan.files.values()):,} bytes, in {len(batches)} commit(s) at most")
    if plan.left_out:
        print(f"not sent (not part of the model; --include PATTERN sends more): {', '.join(_grouped(plan.left_out))}")
    if deletions is None:
        print(f"could not list {repo_id}: remote files the upload would delete are not known")
    elif deletions:
        print(f"deleted from {repo_id} (they would change what loads): {', '.join(deletions)}")
    print(f"README.md ({'generated' if plan.card_generated else 'kept from the folder'}):\n{plan.card}")


def planned_deletions(
    repo_id: str, revision: str | None, token: str | None, plan: Plan, delete_stale: bool
) -> list[str] | None:
    """For a dry run: what the upload would delete, from a read-only listing (None if the Hub cannot be asked)."""
    api = HfApi(token=token or get_token() or False)
    try:
        remote = remote_files(api, repo_id, revision)
    except NETWORK_ERRORS:
        return None
    return stale_files(remote or {}, plan.files, delete_stale)


def upload(
    model_dir: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    dry_run: bool = False,
    base_model: str | None = None,
    license: str | None = None,
    regenerate_card: bool = False,
    max_commit_size: str = "20GB",
    include: list[str] | None = None,
    delete_stale: bool = False,
) -> str | None:
    """Validate, stage and upload `model_dir` to `repo_id`; returns the commit or pull request URL (None for a dry
    run, which writes nothing, locally or remotely; it only lists the repository to show what would be deleted)."""
    max_commit_bytes = convert_file_size_to_int(max_commit_size)
    api = None if dry_run else authenticate(token)
    with tempfile.TemporaryDirectory(prefix="deepseek-moe-upload-") as tmp:
        staging = Path(tmp) / "repo"
        plan = stage(Path(model_dir), staging, repo_id, base_model, license, regenerate_card, include)
        if api is None:
            deletions = planned_deletions(repo_id, revision, token, plan, delete_stale)
            print_plan(plan, repo_id, max_commit_bytes, deletions)
            print("dry run: nothing was sent")
            return None
        print_plan(plan, repo_id, max_commit_bytes, [])
        message = commit_message or f"Upload {plan.kind} with deepseek-moe"
        try:
            url = publish(
                api, staging, plan, repo_id, private, revision, create_pr, message, max_commit_bytes, delete_stale
            )
        except NETWORK_ERRORS as error:
            raise UploadError(
                f"the upload to {api.endpoint} failed ({_one_line(error)}): re-run the same command to resume "
                "(files already on the Hub are skipped)"
            ) from None
    print(f"done: {url}")
    return url
