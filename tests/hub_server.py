"""A small in-memory Hugging Face Hub for tests (stdlib only).

It implements the endpoints that `huggingface_hub` 2.4 and `datasets` 5.2 use to push and load repositories over the
plain HTTP/LFS path (Xet disabled with `HF_HUB_DISABLE_XET=1`):

    GET  /api/whoami-v2                                      who the token belongs to
    POST /api/repos/create                                   create a repo (409 if it exists)
    POST /api/validate-yaml                                  README.md metadata check before a commit
    GET  /api/{type}s/{repo}[/revision/{rev}]                repo info (sha, siblings)
    POST /api/{type}s/{repo}/preupload/{rev}                 upload mode (regular/lfs) and remote oid per file
    POST /api/{type}s/{repo}/commit/{rev}                    NDJSON commit (file, lfsFile, deletedFile, deletedFolder)
    GET  /api/{type}s/{repo}/tree/{rev}[/{path}]             tree listing (recursive, expand)
    POST /api/{type}s/{repo}/paths-info/{rev}                info on given paths (form encoded)
    GET  /api/{type}s/{repo}/commits/{rev}, /refs            history and refs
    POST /{prefix}{repo}.git/info/lfs/objects/batch          LFS batch: "basic" transfer to /lfs-upload/{oid}
    PUT  /lfs-upload/{oid}                                   LFS object upload (sha256 checked)
    HEAD/GET /{prefix}{repo}/resolve/{rev}/{path}            file download with X-Repo-Commit, ETag, X-Linked-Etag,
                                                             X-Linked-Size and Range support

Use the `hub_server` fixture (import it in `tests/conftest.py`: `from hub_server import hub_server  # noqa: F401`),
which yields the endpoint URL (a `str` with `.token` and `.server` attributes), and `run_in_hub_env(script, endpoint)`
to run client code in a fresh interpreter: `huggingface_hub` and `datasets` read `HF_ENDPOINT`, `HF_TOKEN` and
`HF_HUB_DISABLE_XET` at import, so the pytest process (which already imported them, offline) cannot talk to the server.
"""

from __future__ import annotations

import base64
import datetime as _datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

DEFAULT_USER = "calm-tester"
DEFAULT_TOKEN = "hf_calm_test_token"
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# Files uploaded through LFS (what the Hub's default .gitattributes tracks), plus anything large or binary.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".parquet", ".arrow", ".npy", ".npz", ".h5", ".zip",
                ".gz", ".tar", ".msgpack", ".onnx", ".pkl", ".png")
LFS_MIN_SIZE = 10 * 1024 * 1024
LFS_POINTER_SIZE = 134


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return _datetime.datetime.now(_datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class StoredFile:
    size: int
    blob_id: str  # git sha1 of the content (regular) or of the pointer (lfs)
    content: bytes | None = None  # regular files
    lfs_oid: str | None = None  # sha256 of the content, for LFS files


@dataclass
class Commit:
    sha: str
    title: str
    date: str
    files: dict[str, StoredFile]
    parent: str | None = None


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def at(self, revision: str) -> Commit | None:
        revision = unquote(revision)
        if revision in ("main", "refs/heads/main"):
            return self.head
        for commit in self.commits:
            if commit.sha == revision or (len(revision) >= 7 and commit.sha.startswith(revision)):
                return commit
        return None


class HubState:
    """Everything the fake Hub holds; guarded by one lock."""

    def __init__(self, user: str = DEFAULT_USER, token: str = DEFAULT_TOKEN):
        self.user = user
        self.token = token
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []  # (method, path) log, for tests that check what was called

    def new_commit(self, repo: Repo, title: str, files: dict[str, StoredFile]) -> Commit:
        parent = repo.commits[-1].sha if repo.commits else None
        seed = f"{repo.repo_type}/{repo.repo_id}/{len(repo.commits)}/{title}/{parent}/{sorted((p, f.blob_id) for p, f in files.items())}"
        commit = Commit(sha=hashlib.sha1(seed.encode()).hexdigest(), title=title, date=_now(), files=files, parent=parent)
        repo.commits.append(commit)
        return commit


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}  # more JSON fields in the error body


class HubRequestHandler(BaseHTTPRequestHandler):
    server_version = "FakeHub/1.0"
    protocol_version = "HTTP/1.1"

    # ---------------------------------------------------------------- plumbing
    @property
    def state(self) -> HubState:
        return self.server.state  # type: ignore[attr-defined]

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]  # type: ignore[attr-defined]
        return f"http://{host}:{port}"

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    def _read_body(self) -> bytes:
        return self._body

    def _consume_body(self) -> bytes:
        """Read the whole request body first, so an early error never leaves bytes on a kept-alive connection."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str | None = None,
              head: bool = False, content_length: int | None = None):
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None):
        self._send(status, json.dumps(payload).encode(), headers, "application/json")

    def _auth_user(self) -> str | None:
        """User of a valid token, None without a token; 401 on a wrong token."""
        header = self.headers.get("Authorization", "")
        if not header:
            return None
        token = header.split(" ", 1)[-1].strip()
        if token != self.state.token:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.state.user

    def _require_user(self) -> str:
        user = self._auth_user()
        if user is None:
            raise HubError(401, "You must be authenticated to access this resource.")
        return user

    def _repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        user = self._require_user() if write else self._auth_user()
        repo = self.state.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and user is None):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and repo_id.split("/")[0] != user:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.at(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        return commit

    def _dispatch(self, method: str):
        url = urlsplit(self.path)
        path = url.path
        query = parse_qs(url.query)
        self._body = self._consume_body() if method in ("POST", "PUT") else b""
        with self.state.lock:
            self.state.requests.append((method, path))
        try:
            for route_method, pattern, handler in ROUTES:
                if route_method != method and not (route_method == "GET" and method == "HEAD"):
                    continue
                match = re.fullmatch(pattern, path)
                if match:
                    with self.state.lock:
                        return handler(self, query=query, head=method == "HEAD", **match.groupdict())
            raise HubError(404, f"No route for {method} {path}")
        except HubError as error:
            headers = {"X-Error-Message": error.message, **error.headers}
            if error.code:
                headers["X-Error-Code"] = error.code
            body = json.dumps({"error": error.message, **error.extra}).encode()
            self._send(error.status, body, headers, "application/json", head=method == "HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # ---------------------------------------------------------------- account and repos
    def whoami(self, query, head):
        user = self._require_user()
        self._json(200, {"type": "user", "id": "1", "name": user, "fullname": "CalM Tester", "email": None,
                         "orgs": [], "auth": {"type": "access_token",
                                              "accessToken": {"displayName": "tests", "role": "write"}}})

    def create_repo(self, query, head):
        user = self._require_user()
        payload = json.loads(self._read_body() or b"{}")
        namespace = payload.get("organization") or user
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a repo under {namespace}")
        repo_type = payload.get("type") or "model"
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.state.repos:
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        repo = Repo(repo_type, repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        gitattributes = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()
        self.state.new_commit(repo, "initial commit", {
            ".gitattributes": StoredFile(len(gitattributes), git_blob_sha(gitattributes), content=gitattributes)})
        self.state.repos[(repo_type, repo_id)] = repo
        self._json(200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def validate_yaml(self, query, head):
        payload = json.loads(self._read_body() or b"{}")
        content = payload.get("content", "")
        errors = []
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.S)
        if match:
            try:
                metadata = yaml.safe_load(match.group(1)) or {}
            except yaml.YAMLError as error:
                metadata, errors = {}, [{"message": f"Invalid YAML: {error}"}]
            if not isinstance(metadata, dict):
                errors.append({"message": "YAML metadata must be a mapping"})
                metadata = {}
            errors.extend({"message": message} for message in _metadata_errors(metadata, payload.get("repoType")))
        if errors:
            return self._json(400, {"errors": errors, "warnings": []})
        warnings = [] if match else [{"message": "Empty or missing yaml metadata in repo card"}]
        self._json(200, {"errors": [], "warnings": warnings})

    def repo_info(self, query, head, kind, repo_id, revision="main"):
        repo = self._repo(REPO_TYPES[kind], repo_id)
        commit = self._commit(repo, revision or "main")
        siblings = []
        for path, stored in sorted(commit.files.items()):
            sibling = {"rfilename": path, "size": stored.size, "blobId": stored.blob_id}
            if stored.lfs_oid:
                sibling["lfs"] = {"size": stored.size, "sha256": stored.lfs_oid, "pointerSize": LFS_POINTER_SIZE}
            siblings.append(sibling)
        card = _front_matter(commit.files.get("README.md"))
        info = {"_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "author": repo_id.split("/")[0],
                "sha": commit.sha, "lastModified": commit.date, "createdAt": repo.commits[0].date,
                "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
                "tags": card.get("tags", []) if isinstance(card.get("tags"), list) else [],
                "cardData": card or None, "siblings": siblings}
        if repo.repo_type == "model":
            info["library_name"] = card.get("library_name")
            info["pipeline_tag"] = card.get("pipeline_tag")
        self._json(200, info)

    def list_refs(self, query, head, kind, repo_id):
        repo = self._repo(REPO_TYPES[kind], repo_id)
        self._json(200, {"branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": repo.head.sha}],
                         "converts": [], "tags": []})

    def list_commits(self, query, head, kind, repo_id, revision):
        repo = self._repo(REPO_TYPES[kind], repo_id)
        commit = self._commit(repo, revision)
        history = [c for c in repo.commits[: repo.commits.index(commit) + 1]][::-1]
        self._json(200, [{"id": c.sha, "title": c.title, "message": "", "authors": [{"user": self.state.user}],
                          "date": c.date} for c in history])

    # ---------------------------------------------------------------- upload
    def preupload(self, query, head, kind, repo_id, revision):
        repo = self._repo(REPO_TYPES[kind], repo_id, write=True)
        commit = self._commit(repo, revision)
        payload = json.loads(self._read_body() or b"{}")
        files = []
        for entry in payload.get("files", []):
            sample = base64.b64decode(entry.get("sample", ""))
            lfs = (entry["path"].lower().endswith(LFS_SUFFIXES) or entry["size"] >= LFS_MIN_SIZE
                   or b"\0" in sample)
            existing = commit.files.get(entry["path"])
            oid = None
            if existing is not None:
                oid = existing.lfs_oid if existing.lfs_oid else existing.blob_id
            files.append({"path": entry["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._json(200, {"files": files, "commitOid": commit.sha})

    def lfs_batch(self, query, head, prefix, repo_id):
        repo_type = {"": "model", "datasets/": "dataset", "spaces/": "space"}[prefix or ""]
        self._repo(repo_type, repo_id, write=True)
        payload = json.loads(self._read_body() or b"{}")
        objects = []
        for obj in payload.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.endpoint}/lfs-upload/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def lfs_upload(self, query, head, oid):
        data = self._read_body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "LFS object does not match its sha256")
        self.state.lfs_objects[oid] = data
        self._send(200)

    def commit(self, query, head, kind, repo_id, revision):
        repo = self._repo(REPO_TYPES[kind], repo_id, write=True)
        base = self._commit(repo, revision)
        if base is not repo.head:
            raise HubError(400, "Commits are only supported on the main branch head in the fake hub")
        lines = [json.loads(line) for line in self._read_body().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        if header.get("parentCommit") and header["parentCommit"] != repo.head.sha:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(base.files)
        for line in lines:
            key, value = line["key"], line.get("value", {})
            if key == "file":
                content = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"].encode()
                files[value["path"]] = StoredFile(len(content), git_blob_sha(content), content=content)
            elif key == "lfsFile":
                data = self.state.lfs_objects.get(value["oid"])
                if data is None:
                    raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{value['oid']}\n"
                           f"size {len(data)}\n").encode()
                files[value["path"]] = StoredFile(len(data), git_blob_sha(pointer), lfs_oid=value["oid"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                for path in [p for p in files if p.startswith(folder)]:
                    del files[path]
        new = self.state.new_commit(repo, header.get("summary") or "commit", files)
        url = f"{self.endpoint}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}/commit/{new.sha}"
        self._json(200, {"success": True, "commitOid": new.sha, "commitUrl": url, "pullRequestUrl": None})

    # ---------------------------------------------------------------- listing
    def _entries(self, commit: Commit, directory: str, recursive: bool, expand: bool) -> list[dict]:
        prefix = directory.strip("/") + "/" if directory.strip("/") else ""
        entries, folders = [], set()
        for path in sorted(commit.files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append(self._folder_entry(commit, folder, expand))
            if recursive or len(parts) == 1:
                entries.append(self._file_entry(commit, path, expand))
        return entries

    def _file_entry(self, commit: Commit, path: str, expand: bool) -> dict:
        stored = commit.files[path]
        entry = {"type": "file", "oid": stored.blob_id, "size": stored.size, "path": path}
        if stored.lfs_oid:
            entry["lfs"] = {"oid": stored.lfs_oid, "size": stored.size, "pointerSize": LFS_POINTER_SIZE}
        if expand:
            entry["lastCommit"] = {"id": commit.sha, "title": commit.title, "date": commit.date}
        return entry

    def _folder_entry(self, commit: Commit, folder: str, expand: bool) -> dict:
        entry = {"type": "directory", "oid": hashlib.sha1(f"{commit.sha}:{folder}".encode()).hexdigest(),
                 "size": 0, "path": folder}
        if expand:
            entry["lastCommit"] = {"id": commit.sha, "title": commit.title, "date": commit.date}
        return entry

    def tree(self, query, head, kind, repo_id, revision, path=""):
        repo = self._repo(REPO_TYPES[kind], repo_id)
        commit = self._commit(repo, revision)
        path = unquote(path or "").strip("/")
        if path and not any(p.startswith(path + "/") for p in commit.files):
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = query.get("expand", ["false"])[0].lower() in ("1", "true")
        self._json(200, self._entries(commit, path, recursive, expand))

    def paths_info(self, query, head, kind, repo_id, revision):
        repo = self._repo(REPO_TYPES[kind], repo_id)
        commit = self._commit(repo, revision)
        body = self._read_body().decode()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            form = json.loads(body or "{}")
            paths, expand = form.get("paths", []), bool(form.get("expand"))
        else:
            form = parse_qs(body)
            paths, expand = form.get("paths", []), form.get("expand", ["False"])[0].lower() in ("1", "true")
        result = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                result.append(self._file_entry(commit, path, expand))
            elif any(p.startswith(path + "/") for p in commit.files):
                result.append(self._folder_entry(commit, path, expand))
        self._json(200, result)

    # ---------------------------------------------------------------- download
    def resolve(self, query, head, prefix, repo_id, revision, path):
        repo_type = {"": "model", "datasets/": "dataset", "spaces/": "space"}[prefix or ""]
        repo = self._repo(repo_type, repo_id)
        commit = self._commit(repo, revision)
        path = unquote(path)
        stored = commit.files.get(path)
        if stored is None:
            raise HubError(404, f"{path} does not exist on {unquote(revision)}", "EntryNotFound",
                           headers={"X-Repo-Commit": commit.sha})
        data = stored.content if stored.lfs_oid is None else self.state.lfs_objects[stored.lfs_oid]
        headers = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes", "ETag": f'"{stored.blob_id}"'}
        if stored.lfs_oid:
            headers["X-Linked-Etag"] = f'"{stored.lfs_oid}"'
            headers["X-Linked-Size"] = str(stored.size)
        status, body = 200, data
        range_header = self.headers.get("Range")
        if range_header:
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())
            if match:
                start = int(match.group(1)) if match.group(1) else max(0, len(data) - int(match.group(2) or 0))
                end = int(match.group(2)) if match.group(1) and match.group(2) else len(data) - 1
                end = min(end, len(data) - 1)
                if start >= len(data):
                    raise HubError(416, "Requested Range Not Satisfiable",
                                   headers={"Content-Range": f"bytes */{len(data)}"})
                status, body = 206, data[start : end + 1]
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._send(status, body, headers, "application/octet-stream", head=head)


def _front_matter(stored: StoredFile | None) -> dict:
    if stored is None or stored.content is None:
        return {}
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", stored.content.decode("utf-8", "replace"), flags=re.S)
    try:
        data = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _metadata_errors(metadata: dict, repo_type: str | None) -> list[str]:
    """The subset of the Hub's metadata validation that our cards could get wrong."""
    errors = []
    for key in ("license", "library_name", "pipeline_tag", "pretty_name"):
        if key in metadata and not isinstance(metadata[key], (str, list)):
            errors.append(f'"{key}" must be a string')
    if "tags" in metadata and not (isinstance(metadata["tags"], list) and all(isinstance(t, str) for t in metadata["tags"])):
        errors.append('"tags" must be an array of strings')
    model_index = metadata.get("model-index")
    if model_index is not None:
        if repo_type not in (None, "model"):
            errors.append('"model-index" is only allowed in model cards')
        if not isinstance(model_index, list):
            errors.append('"model-index" must be an array')
        else:
            for entry in model_index:
                if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                    errors.append('"model-index[].name" must be a string')
                    continue
                for result in entry.get("results", []):
                    if not isinstance(result.get("task", {}).get("type"), str):
                        errors.append('"model-index[].results[].task.type" is required')
                    dataset = result.get("dataset", {})
                    if not (isinstance(dataset.get("name"), str) and isinstance(dataset.get("type"), str)):
                        errors.append('"model-index[].results[].dataset" needs "name" and "type"')
                    for metric in result.get("metrics", []):
                        value = metric.get("value")
                        if not isinstance(metric.get("type"), str) or value is None or (
                            isinstance(value, float) and value != value):
                            errors.append('"model-index[].results[].metrics[]" needs a "type" and a non-NaN "value"')
    return errors


_REPO = r"(?P<repo_id>[^/]+/[^/]+?)"
_KIND = r"(?P<kind>models|datasets|spaces)"
_PREFIX = r"(?P<prefix>datasets/|spaces/)?"
ROUTES = [
    ("GET", r"/api/whoami-v2", HubRequestHandler.whoami),
    ("POST", r"/api/repos/create", HubRequestHandler.create_repo),
    ("POST", r"/api/validate-yaml", HubRequestHandler.validate_yaml),
    ("POST", rf"/api/{_KIND}/{_REPO}/preupload/(?P<revision>[^/]+)", HubRequestHandler.preupload),
    ("POST", rf"/api/{_KIND}/{_REPO}/commit/(?P<revision>[^/]+)", HubRequestHandler.commit),
    ("POST", rf"/api/{_KIND}/{_REPO}/paths-info/(?P<revision>[^/]+)", HubRequestHandler.paths_info),
    ("GET", rf"/api/{_KIND}/{_REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?", HubRequestHandler.tree),
    ("GET", rf"/api/{_KIND}/{_REPO}/commits/(?P<revision>[^/]+)", HubRequestHandler.list_commits),
    ("GET", rf"/api/{_KIND}/{_REPO}/refs", HubRequestHandler.list_refs),
    ("GET", rf"/api/{_KIND}/{_REPO}/revision/(?P<revision>[^/]+)", HubRequestHandler.repo_info),
    ("GET", rf"/api/{_KIND}/{_REPO}", HubRequestHandler.repo_info),
    ("POST", rf"/{_PREFIX}{_REPO}\.git/info/lfs/objects/batch", HubRequestHandler.lfs_batch),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", HubRequestHandler.lfs_upload),
    ("GET", rf"/{_PREFIX}{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", HubRequestHandler.resolve),
]


class FakeHubServer:
    """The fake Hub on 127.0.0.1 (ephemeral port) in a background thread. Use as a context manager."""

    def __init__(self, user: str = DEFAULT_USER, token: str = DEFAULT_TOKEN):
        self.state = HubState(user=user, token=token)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), HubRequestHandler)
        self.httpd.daemon_threads = True
        self.httpd.state = self.state  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fake-hub", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def token(self) -> str:
        return self.state.token

    def start(self) -> FakeHubServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FakeHubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def files(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes]:
        """Current content of a repo's main branch, for assertions."""
        with self.state.lock:
            repo = self.state.repos[(repo_type, repo_id)]
            return {path: stored.content if stored.lfs_oid is None else self.state.lfs_objects[stored.lfs_oid]
                    for path, stored in repo.head.files.items()}

    def num_commits(self, repo_id: str, repo_type: str = "model") -> int:
        with self.state.lock:
            return len(self.state.repos[(repo_type, repo_id)].commits)


class HubEndpoint(str):
    """The endpoint URL, carrying the server (`.server`) and a valid token (`.token`)."""

    server: FakeHubServer
    token: str


@pytest.fixture(scope="module")
def hub_server():
    """Start a fake Hub for the module; yields its endpoint URL (`str`) with `.token` and `.server`."""
    with FakeHubServer() as server:
        endpoint = HubEndpoint(server.url)
        endpoint.server = server
        endpoint.token = server.token
        yield endpoint


def hub_env(endpoint: str, token: str | None = DEFAULT_TOKEN, hf_home: str | os.PathLike | None = None,
            extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a client process that talks to the fake Hub (online, no Xet, isolated cache)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_EVALUATE_OFFLINE",
                          "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HTTP_PROXY", "HTTPS_PROXY",
                          "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")}
    env.update({
        "HF_ENDPOINT": str(endpoint),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_ETAG_TIMEOUT": "5",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    if token:
        env["HF_TOKEN"] = token
    if hf_home is not None:
        env["HF_HOME"] = str(hf_home)
    env.update(extra_env or {})
    return env


def run_in_hub_env(script: str, endpoint: str, token: str | None = DEFAULT_TOKEN,
                   hf_home: str | os.PathLike | None = None, extra_env: dict[str, str] | None = None,
                   args: list[str] | None = None, timeout: float = 120.0, check: bool = True,
                   cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run `script` (Python source) in a fresh interpreter configured for the fake Hub at `endpoint`.

    The child gets `HF_ENDPOINT`, `HF_TOKEN` (unless `token=None`), `HF_HUB_DISABLE_XET=1`, no offline switches and
    its own `HF_HOME` (a new temporary folder unless `hf_home` is given), so downloads really go to the server.
    With `check=True` a non-zero exit raises an `AssertionError` that shows the child's stdout and stderr.
    """
    with tempfile.TemporaryDirectory(prefix="calm-hub-home-") as default_home:
        env = hub_env(endpoint, token=token, hf_home=hf_home if hf_home is not None else default_home,
                      extra_env=extra_env)
        done = subprocess.run([sys.executable, "-c", script, *(args or [])], env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
    if check and done.returncode != 0:
        raise AssertionError(f"hub subprocess failed ({done.returncode})\n--- stdout\n{done.stdout}\n"
                             f"--- stderr\n{done.stderr}")
    return done


if __name__ == "__main__":  # manual use: python tests/hub_server.py, then export HF_ENDPOINT=<printed url>
    with FakeHubServer() as server:
        print(f"HF_ENDPOINT={server.url} HF_TOKEN={server.token} HF_HUB_DISABLE_XET=1", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
