"""An in-memory Hugging Face Hub on 127.0.0.1 for tests.

It serves what huggingface_hub 2.4 and transformers use to create repositories, upload (the legacy LFS route, so
clients need `HF_HUB_DISABLE_XET=1`), open pull requests and download, and records every request so that a test can
assert what was, or was not, sent. Repositories are git-like: commits are whole trees, refs point at commits, pull
requests are `refs/pr/N`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# (status, JSON payload or raw bytes, extra headers)
Response = tuple[int, dict | list | bytes, dict]
# Files the real Hub stores in LFS: weights, images, anything binary.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".png", ".jpg", ".gguf")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        """What the Hub reports and the client compares: sha256 for LFS files, the git blob sha1 otherwise."""
        return hashlib.sha256(self.data).hexdigest() if self.lfs else git_blob_sha1(self.data)


@dataclass
class Repo:
    private: bool
    trees: dict[str, dict[str, Blob]] = field(default_factory=dict)  # commit sha -> files
    parents: dict[str, str | None] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # "main", "refs/pr/1", ... -> commit sha

    def commit(self, base: str | None, tree: dict[str, Blob], message: str) -> str:
        sha = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
        self.trees[sha], self.parents[sha], self.messages[sha] = tree, base, message
        return sha

    def resolve(self, revision: str) -> str | None:
        return self.refs.get(revision) or (revision if revision in self.trees else None)


class HubError(Exception):
    def __init__(self, status: int, code: str = "", message: str = "", **extra: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


class ServerDeath(Exception):
    """Raised by a route to make the server drop the connection unanswered and stop listening."""


class FakeHub:
    """Start with `FakeHub()`, point clients at `.endpoint`, stop with `.close()`."""

    def __init__(self, token: str = "hf_test_token", user: str = "tester") -> None:
        self.token, self.user = token, user
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        # Set to n to make the commit after the next n fail, as if the connection dropped mid-upload.
        self.commits_before_failure: int | None = None
        # Set to n to make the server die at the commit after the next n: the connection closes without an answer
        # and the port refuses connections until `start()` (same port, same repositories).
        self.commits_before_death: int | None = None
        self.lock = threading.Lock()
        self.port, self.dying = 0, None
        self.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.dying is not None:  # let a dying server release the port first
            self.dying.join()
            self.dying = None
        self.running = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), type("Handler", (_Handler,), {"hub": self}))
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        """Stop listening; connections kept alive from earlier requests are dropped at their next request."""
        self.running = False
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return {path: blob.data for path, blob in repo.trees[repo.resolve(revision)].items()}

    def changed_paths(self, repo_id: str, revision: str = "main") -> set[str]:
        """Paths the commit at `revision` added, changed or removed relative to its parent."""
        repo = self.repos[repo_id]
        sha = repo.resolve(revision)
        tree, parent = repo.trees[sha], repo.trees.get(repo.parents[sha]) or {}
        return {
            p for p in tree.keys() | parent.keys() if p not in tree or p not in parent or tree[p].oid != parent[p].oid
        }

    def history(self, repo_id: str, revision: str = "main") -> list[str]:
        """Commit messages from `revision` back to the repository's creation, newest first."""
        repo, sha, messages = self.repos[repo_id], self.repos[repo_id].resolve(revision), []
        while sha:
            messages.append(repo.messages[sha])
            sha = repo.parents[sha]
        return messages

    def writes(self) -> list[tuple[str, str]]:
        return [(method, path) for method, path in self.requests if method in ("POST", "PUT", "DELETE")]

    # ------------------------------------------------------------------------------------------------ routes

    def route(self, handler: _Handler) -> Response:
        url = urlsplit(handler.path)
        parts = [unquote(part) for part in url.path.strip("/").split("/")]
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        method = handler.command
        authorization = handler.headers.get("Authorization")
        authorized = authorization == f"Bearer {self.token}"
        if authorization and not authorized:
            raise HubError(401, "", "Invalid credentials in Authorization header")
        # LFS upload hrefs are pre-signed on the real Hub: the client sends no token with them.
        public = parts[:2] == ["api", "validate-yaml"] or parts[0] == "lfs-upload"
        if method in ("POST", "PUT", "DELETE") and not authorized and not public:
            raise HubError(401, "", "You must be authenticated to write")
        body = handler.body
        if parts == ["api", "whoami-v2"]:
            if not authorized:
                raise HubError(401, "", "Invalid user token")
            return 200, {"type": "user", "name": self.user, "auth": {"type": "access_token"}}, {}
        if parts == ["api", "repos", "create"]:
            return self.create_repo(json.loads(body))
        if parts == ["api", "validate-yaml"]:
            return 200, {"errors": [], "warnings": []}, {}
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return self.api_models(method, "/".join(parts[2:4]), parts[4:], query, body)
        if len(parts) >= 5 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self.lfs_batch(json.loads(body))
        if method == "PUT" and parts[0] == "lfs-upload":
            if hashlib.sha256(body).hexdigest() != parts[1]:
                raise HubError(400, "", "sha256 mismatch")
            self.lfs_objects[parts[1]] = body
            return 200, {}, {}
        if len(parts) >= 5 and parts[2] == "resolve":
            return self.resolve_file("/".join(parts[:2]), parts[3], "/".join(parts[4:]), handler)
        raise HubError(404, "", f"no route for {method} {url.path}")

    def repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        return self.repos[repo_id]

    def tree(self, repo_id: str, revision: str) -> tuple[str, dict[str, Blob]]:
        repo = self.repo(repo_id)
        sha = repo.resolve(revision)
        if sha is None:
            raise HubError(404, "RevisionNotFound", f"Revision {revision} not found")
        return sha, repo.trees[sha]

    def create_repo(self, request: dict) -> Response:
        repo_id = f"{request.get('organization') or self.user}/{request['name']}"
        if repo_id in self.repos:
            # The real Hub names the existing repository, and create_repo(exist_ok=True) reads it.
            raise HubError(409, "", "You already created this model repo", url=f"{self.endpoint}/{repo_id}")
        repo = self.repos[repo_id] = Repo(
            private=request.get("visibility") == "private" or bool(request.get("private"))
        )
        attributes = Blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", lfs=False)
        repo.refs["main"] = repo.commit(None, {".gitattributes": attributes}, "initial commit")
        return 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id}, {}

    def api_models(self, method: str, repo_id: str, rest: list[str], query: dict, body: bytes) -> Response:
        action, argument = (rest[0], "/".join(rest[1:])) if rest else ("", "main")
        if method == "GET" and action in ("", "revision"):
            sha, files = self.tree(repo_id, argument)
            siblings = [{"rfilename": path} for path in sorted(files)]
            info = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": self.repo(repo_id).private}
            return 200, {**info, "siblings": siblings}, {}
        if method == "GET" and action == "tree":
            revision, _, prefix = argument.partition("/")
            return self.list_tree(repo_id, revision, prefix.strip("/"), query.get("recursive") in ("1", "true", "True"))
        if method == "GET" and action == "refs":
            repo = self.repo(repo_id)
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in repo.refs.items()]
            prs = [{"name": n, "ref": n, "targetCommit": s} for n, s in repo.refs.items() if n.startswith("refs/pr/")]
            branches = [b for b in branches if not b["name"].startswith("refs/")]
            return 200, {"branches": branches, "tags": [], "converts": [], "pullRequests": prs}, {}
        if method == "POST" and action == "branch":
            repo = self.repo(repo_id)
            if argument in repo.refs:
                raise HubError(409, "", f"Branch {argument} already exists")
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            repo.refs[argument], _ = self.tree(repo_id, start)
            return 200, {}, {}
        if method == "POST" and action == "preupload":
            _, files = self.tree(repo_id, argument)
            modes = [
                {"path": f["path"], "uploadMode": _upload_mode(f), "shouldIgnore": False, "oid": _oid(files, f)}
                for f in json.loads(body)["files"]
            ]
            return 200, {"files": modes, "commitOid": None}, {}
        if method == "POST" and action == "commit":
            return self.commit(repo_id, argument, query.get("create_pr") == "1", body)
        raise HubError(404, "", f"no route for {method} /api/models/{repo_id}/{'/'.join(rest)}")

    def list_tree(self, repo_id: str, revision: str, prefix: str, recursive: bool) -> Response:
        _, files = self.tree(repo_id, revision)
        base = f"{prefix}/" if prefix else ""
        entries, folders = [], set()
        for path, blob in sorted(files.items()):
            if not path.startswith(base):
                continue
            inside = path[len(base) :].split("/")
            for depth in range(1, len(inside)):
                if recursive or depth == 1:
                    folders.add(base + "/".join(inside[:depth]))
            if recursive or len(inside) == 1:
                entry = {"type": "file", "path": path, "size": len(blob.data), "oid": git_blob_sha1(blob.data)}
                if blob.lfs:
                    entry["lfs"] = {"oid": blob.oid, "size": len(blob.data), "pointerSize": 134}
                entries.append(entry)
        entries += [{"type": "directory", "path": folder, "oid": git_blob_sha1(folder.encode())} for folder in folders]
        return 200, entries, {}

    def lfs_batch(self, request: dict) -> Response:
        objects = []
        for item in request["objects"]:
            entry = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in self.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.endpoint}/lfs-upload/{item['oid']}"}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {}

    def commit(self, repo_id: str, revision: str, create_pr: bool, body: bytes) -> Response:
        repo = self.repo(repo_id)
        base, files = self.tree(repo_id, revision)
        if self.commits_before_death is not None:
            self.commits_before_death -= 1
            if self.commits_before_death < 0:
                self.commits_before_death = None
                raise ServerDeath
        if self.commits_before_failure is not None:
            self.commits_before_failure -= 1
            if self.commits_before_failure < 0:
                self.commits_before_failure = None
                raise HubError(400, "", "simulated failure: the upload was interrupted")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        if header.get("parentCommit") and header["parentCommit"] != base:
            raise HubError(412, "", f"parent commit {header['parentCommit']} is not the head of {revision}")
        tree = dict(files)
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                tree[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    raise HubError(400, "", f"LFS object {value['oid']} was never uploaded")
                tree[value["path"]] = Blob(self.lfs_objects[value["oid"]], lfs=True)
            elif key == "deletedFile":
                tree.pop(value["path"], None)
        sha = repo.commit(base, tree, header["summary"])
        pr_url = None
        if create_pr:
            number = 1 + sum(ref.startswith("refs/pr/") for ref in repo.refs)
            repo.refs[f"refs/pr/{number}"] = sha
            pr_url = f"{self.endpoint}/{repo_id}/discussions/{number}"
        elif revision in repo.refs:
            repo.refs[revision] = sha
        else:
            raise HubError(400, "", f"cannot commit to {revision}: not a branch")
        return (
            200,
            {"commitOid": sha, "commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}", "pullRequestUrl": pr_url},
            {},
        )

    def resolve_file(self, repo_id: str, revision: str, path: str, handler: _Handler) -> Response:
        sha, files = self.tree(repo_id, revision)
        if path not in files:
            raise HubError(404, "EntryNotFound", f"{path} does not exist at {revision}")
        blob = files[path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob.oid}"', "Accept-Ranges": "bytes"}
        data, status = blob.data, 200
        byte_range = handler.headers.get("Range")
        if byte_range and byte_range.startswith("bytes="):
            start, _, end = byte_range[len("bytes=") :].partition("-")
            first, last = int(start or 0), min(int(end) if end else len(data) - 1, len(data) - 1)
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
            data, status = data[first : last + 1], 206
        return status, data, headers


def _upload_mode(file: dict) -> str:
    sample = base64.b64decode(file.get("sample", ""))
    binary = b"\0" in sample
    return "lfs" if file["path"].endswith(LFS_SUFFIXES) or binary or file["size"] > 10_000_000 else "regular"


def _oid(files: dict[str, Blob], file: dict) -> str | None:
    blob = files.get(file["path"])
    return blob.oid if blob else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every response sets Content-Length
    hub: FakeHub

    def log_message(self, format: str, *args) -> None:
        pass

    def _read_body(self) -> bytes:
        """Read the whole body even when unused: an unread body would corrupt the next request on this connection."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().strip(), 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        self.body = self._read_body()
        if not self.hub.running:  # a closed server answers nothing, even on a connection that was kept alive
            self.close_connection = True
            return
        with self.hub.lock:
            self.hub.requests.append((self.command, urlsplit(self.path).path))
            try:
                status, payload, headers = self.hub.route(self)
            except ServerDeath:
                self.hub.running = False
                self.close_connection = True
                self.hub.dying = threading.Thread(target=self.hub.close, daemon=True)
                self.hub.dying.start()
                return
            except HubError as error:
                status, payload = error.status, {"error": error.message, **error.extra}
                headers = {"X-Error-Code": error.code, "X-Error-Message": error.message} if error.code else {}
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header(
            "Content-Type", "application/octet-stream" if isinstance(payload, bytes) else "application/json"
        )
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle
