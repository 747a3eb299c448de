"""A Hub-compatible HTTP server for the tests, and a worker that runs Hub client code against it.

`HubServer` answers what huggingface_hub 2.4 / transformers 5.23 send (/work/shared/HUB_PROTOCOL.md): repos (create,
delete, settings), whoami, model info, tree, paths-info, refs, commits, branches, tags, preupload, the NDJSON commit
(atomic: every operation applies or none), the git-LFS batch API with sha256-checked PUTs, and `resolve` downloads
(HEAD / GET, ETag, X-Repo-Commit, Range -> 206). Private repos need `Authorization: Bearer <token>` of a user with
access; an unknown or revoked token is a 401 on every request, as on the Hub. Contents live under a temporary folder.
`fail(...)` injects failures (an HTTP status or a dropped connection) into one stage, for interrupted-upload tests.

`HubClient` is a long-lived Python subprocess configured for the server (`HF_ENDPOINT`, `HF_HOME`,
`HF_HUB_DISABLE_XET`, ...: huggingface_hub reads them when it is imported, so the client must be a fresh
interpreter). Tests send it code to run; it answers with the code's `result` or the exception it raised.
"""

import base64
import fnmatch
import hashlib
import json
import os
import re
import secrets
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.npy", "*.npz",
                "*.zip", "*.gz", "*.tar", "*.arrow", "*.parquet", "*tfevents*")
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS).encode()
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
# What the Hub's metadata validation checks, in miniature (https://huggingface.co/docs/hub/model-cards).
KNOWN_LICENSES = {"apache-2.0", "mit", "bsd-3-clause", "cc-by-4.0", "cc-by-nc-4.0", "cc-by-sa-4.0", "openrail",
                  "llama3", "gemma", "other", "unknown"}
KNOWN_PIPELINE_TAGS = {"image-text-to-text", "text-to-image", "text-generation", "image-to-text",
                       "visual-question-answering", "any-to-any", "feature-extraction"}


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Entry:
    """A file at a commit: its size, git oid (of the pointer file for LFS files) and sha256 (the stored object)."""

    size: int
    git_oid: str
    sha256: str
    lfs: bool

    def tree_item(self, path: str) -> dict:
        item = {"type": "file", "oid": self.git_oid, "size": self.size, "path": path}
        if self.lfs:
            pointer_size = len(lfs_pointer(self.sha256, self.size))
            item["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": pointer_size}
        return item


@dataclass
class Commit:
    id: str
    parent: str | None
    title: str
    message: str
    date: str
    author: str
    files: dict[str, Entry]


@dataclass
class Repo:
    type: str
    id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_objects: set[str] = field(default_factory=set)  # sha256 of the LFS objects uploaded to this repo

    @property
    def namespace(self) -> str:
        return self.id.split("/")[0]


@dataclass(frozen=True)
class User:
    name: str
    orgs: tuple[str, ...] = ()
    role: str = "write"

    def can_access(self, namespace: str) -> bool:
        return namespace == self.name or namespace in self.orgs


@dataclass
class Failure:
    """Fail the requests of `stage` after the first `after` of them, `times` times (None: until cleared)."""

    stage: str
    status: int
    after: int
    times: int | None
    drop: bool
    seen: int = 0
    fired: int = 0


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    route: str
    status: int
    user: str | None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.body = {"error": message, **(body or {})}


def not_visible(repo_id: str, user: User | None) -> HubError:
    """A missing repo, or a private one the caller cannot see: 401 when anonymous, else 404 (the Hub hides both)."""
    return HubError(401 if user is None else 404, f"Repository {repo_id} not found", "RepoNotFound")


class HubServer:
    """The server and its state. `start()` serves on 127.0.0.1 (a free port) in a daemon thread."""

    def __init__(self, root: Path, lfs_threshold: int = 10 * 2**20):
        self.root = Path(root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        self.lfs_threshold = lfs_threshold
        self.repos: dict[tuple[str, str], Repo] = {}
        self.tokens: dict[str, User] = {}
        self.revoked: set[str] = set()
        self.failures: list[Failure] = []
        self.log: list[RequestRecord] = []
        self.unhandled: list[str] = []
        self.lfs_puts: dict[tuple[str, str], int] = {}  # (repo id, sha256) -> accepted LFS uploads
        self.upload_secret = secrets.token_hex(16)
        self.lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None

    # ----- lifecycle -----
    def start(self) -> "HubServer":
        handler = type("BoundHubHandler", (HubRequestHandler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # ----- users, tokens, failures -----
    def add_token(self, user: str, orgs: tuple[str, ...] = (), role: str = "write") -> str:
        token = "hf_" + secrets.token_hex(16)
        self.tokens[token] = User(user, tuple(orgs), role)
        return token

    def revoke(self, token: str) -> None:
        self.revoked.add(token)

    def fail(self, stage: str, status: int = 500, after: int = 0, times: int | None = None, drop: bool = False) -> None:
        """Make requests of `stage` ("lfs_put", "commit", "preupload", "lfs_batch", "resolve", ...: the route names)
        fail with `status` (or a dropped connection) after the first `after`, `times` times or until cleared."""
        self.failures.append(Failure(stage, status, after, times, drop))

    def clear_failures(self) -> None:
        self.failures.clear()

    def injected_failure(self, stage: str) -> Failure | None:
        with self.lock:
            for failure in self.failures:
                if failure.stage != stage:
                    continue
                failure.seen += 1
                if failure.seen > failure.after and (failure.times is None or failure.fired < failure.times):
                    failure.fired += 1
                    return failure
        return None

    # ----- inspection (for assertions) -----
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> Commit:
        repo = self.repo(repo_id, repo_type)
        return repo.commits[self.resolve_revision(repo, revision)]

    def history(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[Commit]:
        """Commits from `revision` back to the repo's first, newest first."""
        repo = self.repo(repo_id, repo_type)
        commit, chain = repo.commits[self.resolve_revision(repo, revision)], []
        while commit is not None:
            chain.append(commit)
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return chain

    def read(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        return self.object_path(self.head(repo_id, revision, repo_type).files[path].sha256).read_bytes()

    # ----- storage -----
    def object_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256

    def store(self, content: bytes) -> Entry:
        sha256 = hashlib.sha256(content).hexdigest()
        path = self.object_path(sha256)
        if not path.exists():
            path.write_bytes(content)
        return Entry(len(content), git_blob_oid(content), sha256, lfs=False)

    def lfs_entry(self, sha256: str, size: int) -> Entry:
        return Entry(size, git_blob_oid(lfs_pointer(sha256, size)), sha256, lfs=True)

    def has_lfs_object(self, repo: Repo, sha256: str, size: int) -> bool:
        """LFS objects belong to a repo (as on the Hub): one uploaded to another repo must be uploaded again."""
        path = self.object_path(sha256)
        return sha256 in repo.lfs_objects and path.exists() and path.stat().st_size == size

    def new_commit(self, repo: Repo, parent: str | None, title: str, message: str, author: str,
                   files: dict[str, Entry]) -> Commit:
        date = now()
        tree = sorted((path, entry.git_oid) for path, entry in files.items())
        digest = hashlib.sha1(json.dumps([repo.id, parent, title, message, date, secrets.token_hex(4), tree]).encode())
        digest = digest.hexdigest()
        commit = Commit(digest, parent, title, message, date, author, files)
        repo.commits[digest] = commit
        return commit

    def resolve_revision(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.tags:
            return repo.tags[revision]
        if re.fullmatch(r"[0-9a-f]{40}", revision) and revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer  # bound by HubServer.start

    TYPE = r"(?P<type>models|datasets|spaces)"
    REPO = r"(?P<repo>[^/]+/[^/]+)"
    PREFIX = r"(?P<prefix>datasets/|spaces/)?"
    ROUTES = [
        ("GET", r"/api/agent-harnesses", "agent_harnesses"),
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("DELETE", r"/api/repos/delete", "delete_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("PUT", rf"/api/{TYPE}/{REPO}/settings", "settings"),
        ("GET", rf"/api/{TYPE}/{REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
        ("GET", rf"/api/{TYPE}/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
        ("POST", rf"/api/{TYPE}/{REPO}/paths-info/(?P<rev>[^/]+)", "paths_info"),
        ("GET", rf"/api/{TYPE}/{REPO}/refs", "refs"),
        ("GET", rf"/api/{TYPE}/{REPO}/commits/(?P<rev>[^/]+)", "commits"),
        ("POST", rf"/api/{TYPE}/{REPO}/branch/(?P<name>[^/]+)", "create_branch"),
        ("DELETE", rf"/api/{TYPE}/{REPO}/branch/(?P<name>[^/]+)", "delete_branch"),
        ("POST", rf"/api/{TYPE}/{REPO}/tag/(?P<rev>[^/]+)", "create_tag"),
        ("DELETE", rf"/api/{TYPE}/{REPO}/tag/(?P<name>[^/]+)", "delete_tag"),
        ("POST", rf"/api/{TYPE}/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", rf"/api/{TYPE}/{REPO}/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", rf"/{PREFIX}{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", rf"/_lfs/{TYPE}/{REPO}/(?P<oid>[0-9a-f]{{64}})", "lfs_put"),
        ("GET", rf"/{PREFIX}{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        ("HEAD", rf"/{PREFIX}{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]

    def log_message(self, format, *args) -> None:  # noqa: A002 (BaseHTTPRequestHandler's signature)
        pass

    def do_GET(self):
        self.dispatch()

    def do_HEAD(self):
        self.dispatch()

    def do_POST(self):
        self.dispatch()

    def do_PUT(self):
        self.dispatch()

    def do_DELETE(self):
        self.dispatch()

    # ----- plumbing -----
    def dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""  # always read the whole body (keep-alive)
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        route, params = self.match(split.path)
        self.status, self.user_name = 0, None
        try:
            if route is None:
                self.hub.unhandled.append(f"{self.command} {self.path}")
                raise HubError(404, f"{self.command} {split.path} is not implemented by the test Hub")
            user = self.authenticate()
            self.user_name = user.name if user else None
            failure = self.hub.injected_failure(route)
            if failure is not None and failure.drop:
                self.status = -1
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if failure is not None:
                raise HubError(failure.status, f"injected failure ({route})")
            getattr(self, "route_" + route)(user, **params)
        except HubError as error:
            headers = dict(error.headers)
            if error.code:
                headers["X-Error-Code"] = error.code
            headers["X-Error-Message"] = error.message
            self.send_json(error.body, error.status, headers)
        finally:
            self.hub.log.append(RequestRecord(self.command, split.path, route or "", self.status, self.user_name))

    def match(self, path: str) -> tuple[str | None, dict]:
        for method, pattern, route in self.ROUTES:
            found = re.fullmatch(pattern, path) if method == self.command else None
            if found:
                return route, {k: unquote(v) for k, v in found.groupdict().items() if v is not None}
        return None, {}

    def send(self, status: int, body: bytes = b"", headers: dict | None = None, content_length: int | None = None):
        self.status = status
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, data, status: int = 200, headers: dict | None = None) -> None:
        self.send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def json_body(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"the request body is not JSON: {error}")

    @property
    def base_url(self) -> str:
        return self.hub.url

    # ----- auth -----
    def authenticate(self) -> User | None:
        header = self.headers.get("Authorization")
        if not header:
            return None
        token = header.removeprefix("Bearer ").strip()
        if token in self.hub.revoked or token not in self.hub.tokens:
            raise HubError(401, INVALID_CREDENTIALS)
        return self.hub.tokens[token]

    def readable_repo(self, user: User | None, repo_type: str, repo_id: str) -> Repo:
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and (user is None or not user.can_access(repo.namespace))):
            raise not_visible(repo_id, user)
        return repo

    def writable_repo(self, user: User | None, repo_type: str, repo_id: str) -> Repo:
        repo = self.readable_repo(user, repo_type, repo_id)
        self.require_write(user, repo.namespace)
        return repo

    @staticmethod
    def require_write(user: User | None, namespace: str) -> None:
        if user is None:
            raise HubError(401, "You must be authenticated to do this (pass a token)")
        if user.role != "write":
            raise HubError(403, "This token is read-only: it cannot write to repositories")
        if not user.can_access(namespace):
            raise HubError(403, f"You don't have the rights to write to the namespace {namespace}")

    def repo_and_commit(self, user, type, repo, rev) -> tuple[Repo, Commit]:  # noqa: A002
        repository = self.readable_repo(user, REPO_TYPES[type], repo)
        return repository, repository.commits[self.hub.resolve_revision(repository, rev)]

    # ----- account, repos -----
    def route_agent_harnesses(self, user):
        self.send_json({"standardEnvVars": [], "harnesses": {}})

    def route_whoami(self, user):
        if user is None:
            raise HubError(401, "Invalid username or password.")
        self.send_json({"type": "user", "name": user.name, "orgs": [{"name": org} for org in user.orgs],
                        "auth": {"accessToken": {"displayName": "test", "role": user.role}}})

    def route_create_repo(self, user):
        data = self.json_body()
        repo_type = data.get("type") or "model"
        namespace = data.get("organization") or (user.name if user else None)
        repo_id = f"{namespace}/{data.get('name')}"
        self.require_write(user, namespace or "")
        url = f"{self.base_url}/{URL_PREFIXES[repo_type]}{repo_id}"
        with self.hub.lock:
            if (repo_type, repo_id) in self.hub.repos:
                raise HubError(409, "You already created this repo", body={"url": url})
            repo = Repo(repo_type, repo_id, data.get("visibility") == "private" or bool(data.get("private")), now())
            gitattributes = self.hub.store(GITATTRIBUTES)
            first = self.hub.new_commit(repo, None, "initial commit", "", user.name, {".gitattributes": gitattributes})
            repo.branches["main"] = first.id
            self.hub.repos[(repo_type, repo_id)] = repo
        self.send_json({"url": url, "name": repo_id, "id": secrets.token_hex(12)})

    def route_delete_repo(self, user):
        data = self.json_body()
        repo_type = data.get("type") or "model"
        repo_id = f"{data.get('organization') or (user.name if user else '')}/{data.get('name')}"
        self.writable_repo(user, repo_type, repo_id)
        with self.hub.lock:
            del self.hub.repos[(repo_type, repo_id)]
        self.send_json({})

    def route_settings(self, user, type, repo):  # noqa: A002
        repository = self.writable_repo(user, REPO_TYPES[type], repo)
        data = self.json_body()
        if "visibility" in data:
            repository.private = data["visibility"] == "private"
        elif "private" in data:
            repository.private = bool(data["private"])
        self.send_json({})

    def route_validate_yaml(self, user):
        content = self.json_body().get("content", "")
        errors = [{"message": message} for message in validate_card_metadata(content)]
        self.send_json({"errors": errors, "warnings": []}, 400 if errors else 200)

    # ----- reading -----
    def route_repo_info(self, user, type, repo, rev="main"):  # noqa: A002
        repository, commit = self.repo_and_commit(user, type, repo, rev)
        metadata = card_metadata(self.hub, commit)
        with_blobs = "blobs" in self.query or "files_metadata" in self.query
        siblings = [{"rfilename": path, **({"size": e.size, "blobId": e.git_oid, **(
            {"lfs": {"sha256": e.sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.sha256, e.size))}}
            if e.lfs else {})} if with_blobs else {})} for path, e in sorted(commit.files.items())]
        info = {"_id": hashlib.md5(repository.id.encode()).hexdigest()[:24], "id": repository.id,
                "modelId": repository.id, "author": repository.namespace, "sha": commit.id,
                "private": repository.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
                "lastModified": commit.date, "createdAt": repository.created_at, "siblings": siblings,
                "tags": list(metadata.get("tags") or []), "usedStorage": sum(e.size for e in commit.files.values())}
        for key in ("library_name", "pipeline_tag"):
            if key in metadata:
                info[key] = metadata[key]
        if metadata:
            info["cardData"] = metadata
        self.send_json(info)

    def route_tree(self, user, type, repo, rev, path=""):  # noqa: A002
        _, commit = self.repo_and_commit(user, type, repo, rev)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        items, folders = [], set()
        for file_path, entry in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            relative = file_path[len(prefix):].split("/")
            depth_limit = len(relative) if recursive else 1
            for depth in range(1, min(len(relative), depth_limit + 1)):
                folders.add(prefix + "/".join(relative[:depth]))
            if recursive or len(relative) == 1:
                items.append(entry.tree_item(file_path))
        if prefix and not items and not folders:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        items += [{"type": "directory", "oid": hashlib.sha1((commit.id + f).encode()).hexdigest(), "size": 0,
                   "path": f} for f in sorted(folders)]
        self.send_json(items)

    def route_paths_info(self, user, type, repo, rev):  # noqa: A002
        _, commit = self.repo_and_commit(user, type, repo, rev)
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = self.json_body().get("paths", [])
        else:
            paths = parse_qs(self.body.decode()).get("paths", [])
        items = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                items.append(commit.files[path].tree_item(path))
            elif any(p.startswith(path + "/") for p in commit.files):
                items.append({"type": "directory", "oid": hashlib.sha1((commit.id + path).encode()).hexdigest(),
                              "size": 0, "path": path})
        self.send_json(items)

    def route_refs(self, user, type, repo):  # noqa: A002
        repository = self.readable_repo(user, REPO_TYPES[type], repo)
        refs = {
            "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c}
                         for n, c in repository.branches.items()],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in repository.tags.items()],
            "converts": [],
        }
        if "include_prs" in self.query:
            refs["pullRequests"] = []
        self.send_json(refs)

    def route_commits(self, user, type, repo, rev):  # noqa: A002
        repository, _ = self.repo_and_commit(user, type, repo, rev)
        history = self.hub.history(repository.id, rev, repository.type)
        self.send_json([{"id": c.id, "title": c.title, "message": c.message, "date": c.date,
                         "authors": [{"user": c.author, "avatar": None}]} for c in history])

    def route_resolve(self, user, repo, rev, path, prefix=""):
        repo_type = {"": "model", "datasets/": "dataset", "spaces/": "space"}[prefix]
        repository = self.readable_repo(user, repo_type, repo)
        commit = repository.commits[self.hub.resolve_revision(repository, rev)]
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"{path} does not exist at {rev}", "EntryNotFound", {"X-Repo-Commit": commit.id})
        headers = {"X-Repo-Commit": commit.id, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                   "ETag": f'"{entry.sha256 if entry.lfs else entry.git_oid}"'}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": entry.size})
        start, end = 0, entry.size - 1
        status, requested = 200, self.headers.get("Range")
        if requested:
            start, end = parse_range(requested, entry.size)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        if self.command == "HEAD":
            self.send(status, headers=headers, content_length=end - start + 1)
            return
        with self.hub.object_path(entry.sha256).open("rb") as stored:
            stored.seek(start)
            self.send(status, stored.read(end - start + 1), headers)

    # ----- branches and tags -----
    def route_create_branch(self, user, type, repo, name):  # noqa: A002
        repository = self.writable_repo(user, REPO_TYPES[type], repo)
        start = self.json_body().get("startingPoint") or "main"
        with self.hub.lock:
            if name in repository.branches:
                raise HubError(409, f"Branch {name} already exists")
            repository.branches[name] = self.hub.resolve_revision(repository, start)
        self.send_json({})

    def route_delete_branch(self, user, type, repo, name):  # noqa: A002
        repository = self.writable_repo(user, REPO_TYPES[type], repo)
        if name == "main":
            raise HubError(403, "The main branch cannot be deleted")
        if repository.branches.pop(name, None) is None:
            raise HubError(404, f"Branch {name} does not exist", "RevisionNotFound")
        self.send_json({})

    def route_create_tag(self, user, type, repo, rev):  # noqa: A002
        repository = self.writable_repo(user, REPO_TYPES[type], repo)
        tag = self.json_body().get("tag")
        with self.hub.lock:
            if tag in repository.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repository.tags[tag] = self.hub.resolve_revision(repository, rev)
        self.send_json({})

    def route_delete_tag(self, user, type, repo, name):  # noqa: A002
        repository = self.writable_repo(user, REPO_TYPES[type], repo)
        if repository.tags.pop(name, None) is None:
            raise HubError(404, f"Tag {name} does not exist", "RevisionNotFound")
        self.send_json({})

    # ----- uploads -----
    def branch_head(self, repository: Repo, rev: str) -> Commit:
        if rev not in repository.branches:
            raise HubError(404, f"Invalid rev id: {rev} (commits go to branches)", "RevisionNotFound")
        return repository.commits[repository.branches[rev]]

    def route_preupload(self, user, type, repo, rev):  # noqa: A002
        repository = self.writable_repo(user, REPO_TYPES[type], repo)
        head = self.branch_head(repository, rev)
        files = []
        for item in self.json_body().get("files", []):
            path = item["path"]
            lfs = item["size"] >= self.hub.lfs_threshold or any(fnmatch.fnmatch(path.split("/")[-1], p)
                                                                 for p in LFS_PATTERNS)
            existing = head.files.get(path)
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": existing.git_oid if existing else None})
        self.send_json({"files": files, "commitOid": head.id})

    def upload_signature(self, repository: Repo, oid: str) -> str:
        return hashlib.sha256(f"{self.hub.upload_secret}/{repository.type}/{repository.id}/{oid}".encode()).hexdigest()

    def route_lfs_batch(self, user, repo, prefix=""):
        repo_type = {"": "model", "datasets/": "dataset", "spaces/": "space"}[prefix]
        repository = self.writable_repo(user, repo_type, repo)
        data = self.json_body()
        if data.get("operation") != "upload":
            raise HubError(400, "only the upload operation is supported")
        objects = []
        for item in data.get("objects", []):
            oid, size = item["oid"], int(item["size"])
            answer = {"oid": oid, "size": size}
            if not self.hub.has_lfs_object(repository, oid, size):
                href = f"{self.base_url}/_lfs/{repository.type}s/{repository.id}/{oid}"
                answer["authenticated"] = True
                answer["actions"] = {"upload": {"href": f"{href}?sig={self.upload_signature(repository, oid)}"}}
            objects.append(answer)
        self.send_json({"transfer": "basic", "objects": objects})

    def route_lfs_put(self, user, type, repo, oid):  # noqa: A002
        """The upload URL handed out by the batch API (pre-signed, so the client sends no token)."""
        repository = self.hub.repos.get((REPO_TYPES[type], repo))
        if repository is None or self.query.get("sig", [""])[0] != self.upload_signature(repository, oid):
            raise HubError(403, "invalid upload signature")
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"sha256 mismatch: the uploaded content does not hash to {oid}")
        self.hub.store(self.body)
        with self.hub.lock:
            repository.lfs_objects.add(oid)
            key = (repository.id, oid)
            self.hub.lfs_puts[key] = self.hub.lfs_puts.get(key, 0) + 1
        self.send(200)

    def route_commit(self, user, type, repo, rev):  # noqa: A002
        repository = self.writable_repo(user, REPO_TYPES[type], repo)
        if self.query.get("create_pr"):
            raise HubError(400, "pull requests are not supported by the test Hub")
        try:
            lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise HubError(400, f"malformed NDJSON commit payload: {error}")
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        with self.hub.lock:  # validate every operation, then apply all of them: a commit is atomic
            head = self.branch_head(repository, rev)
            parent = header.get("parentCommit")
            if parent and not head.id.startswith(parent):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for operation in lines[1:]:
                self.apply(repository, files, operation.get("key"), operation.get("value") or {})
            commit = self.hub.new_commit(repository, head.id, header.get("summary", ""), header.get("description", ""),
                                         user.name, files)
            repository.branches[rev] = commit.id
        url = f"{self.base_url}/{URL_PREFIXES[repository.type]}{repository.id}/commit/{commit.id}"
        self.send_json({"commitUrl": url, "commitOid": commit.id, "pullRequestUrl": None})

    def apply(self, repository: Repo, files: dict[str, Entry], key: str, value: dict) -> None:
        path = str(value.get("path", "")).strip("/")
        if key == "file":
            files[path] = self.hub.store(base64.b64decode(value["content"]))
        elif key == "lfsFile":
            oid, size = value["oid"], int(value["size"])
            if not self.hub.has_lfs_object(repository, oid, size):
                raise HubError(422, f"LFS object {oid} of {path} was never uploaded (upload it first)")
            files[path] = self.hub.lfs_entry(oid, size)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            inside = [p for p in files if p.startswith(path + "/")]
            if not inside:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in inside:
                del files[p]
        else:
            raise HubError(400, f"unsupported commit operation {key!r}")


def parse_range(header: str, size: int) -> tuple[int, int]:
    """`bytes=a-b`, `bytes=a-` or `bytes=-n` -> inclusive (start, end); 416 when it is outside the file."""
    found = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not found or found.groups() == ("", ""):
        raise HubError(416, f"unsupported Range {header!r}")
    first, last = found.groups()
    if first == "":
        start, end = max(0, size - int(last)), size - 1
    else:
        start, end = int(first), min(size - 1, int(last)) if last else size - 1
    if start > end or start >= size:
        raise HubError(416, f"Range {header!r} is outside the file ({size} bytes)",
                       headers={"Content-Range": f"bytes */{size}"})
    return start, end


def split_card(content: str) -> tuple[dict | None, str | None]:
    """The YAML front matter of a card as a dict (None when absent), or the reason it cannot be read."""
    found = re.match(r"^\s*---[\r\n]+(.*?)[\r\n]+---[\r\n]", content, re.DOTALL)
    if not found:
        return None, None
    try:
        data = yaml.safe_load(found.group(1))
    except yaml.YAMLError as error:
        return None, f"the metadata is not valid YAML: {error}"
    if data is not None and not isinstance(data, dict):
        return None, "the metadata must be a YAML mapping"
    return data or {}, None


def card_metadata(hub: HubServer, commit: Commit) -> dict:
    entry = commit.files.get("README.md")
    if entry is None:
        return {}
    return split_card(hub.object_path(entry.sha256).read_text(encoding="utf-8"))[0] or {}


def validate_card_metadata(content: str) -> list[str]:
    """The checks of the Hub's /api/validate-yaml that matter for model cards, as error messages."""
    data, problem = split_card(content)
    if problem:
        return [problem]
    if data is None:
        return []
    errors = []
    if "license" in data and data["license"] not in KNOWN_LICENSES:
        errors.append(f'"license" must be a known license identifier, got {data["license"]!r}')
    if "pipeline_tag" in data and data["pipeline_tag"] not in KNOWN_PIPELINE_TAGS:
        errors.append(f'"pipeline_tag" must be a known task, got {data["pipeline_tag"]!r}')
    for key in ("tags", "datasets", "base_model", "language", "metrics"):
        value = data.get(key)
        values = [value] if isinstance(value, str) else value
        if value is not None and not (isinstance(values, list) and all(isinstance(v, str) for v in values)):
            errors.append(f'"{key}" must be a string or a list of strings')
    for model in data.get("model-index") or []:
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            errors.append('"model-index" entries need a "name"')
            continue
        for result in model.get("results") or []:
            if not isinstance((result.get("task") or {}).get("type"), str):
                errors.append('"model-index" results need "task.type"')
            if not isinstance((result.get("dataset") or {}).get("type"), str):
                errors.append('"model-index" results need "dataset.type"')
            for metric in result.get("metrics") or []:
                if not isinstance(metric.get("type"), str) or "value" not in metric:
                    errors.append('"model-index" metrics need "type" and "value"')
    return errors


# --------------------------------------------------------------------------------------------------------- the client
WORKER = textwrap.dedent(
    """
    import json, os, sys, traceback
    results = os.fdopen(int(sys.argv[1]), "w")
    namespace = {"__name__": "hub_client"}  # shared by every request: the preamble's imports and helpers stay
    for line in sys.stdin:
        request = json.loads(line)
        namespace.pop("result", None)
        namespace["args"] = request["args"]
        try:
            exec(compile(request["code"], "<hub-client>", "exec"), namespace)
            answer = {"ok": True, "result": namespace.get("result")}
        except BaseException as error:
            answer = {"ok": False, "type": type(error).__name__, "message": str(error),
                      "mro": [c.__name__ for c in type(error).__mro__], "traceback": traceback.format_exc()}
        sys.stdout.flush(); sys.stderr.flush()
        results.write(json.dumps(answer) + "\\n"); results.flush()
    """
)


class RemoteError(Exception):
    """An exception raised by code run in the client process: `type` (its class name), `mro` (class names), message."""

    def __init__(self, answer: dict):
        super().__init__(f"{answer['type']}: {answer['message']}\n{answer['traceback']}")
        self.type, self.mro, self.message = answer["type"], answer["mro"], answer["message"]


def hub_env(server: HubServer, hf_home: Path, token: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a Hub client process: the server as endpoint, its own HF_HOME, Xet off, no telemetry."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env.pop("TRANSFORMERS_OFFLINE", None)
    if env.get("PYTHONPATH"):  # the clients run in other folders: relative entries (PYTHONPATH=src) must not break
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    env.update(HF_ENDPOINT=server.url, HF_HOME=str(hf_home), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false", DISABLE_SAFETENSORS_CONVERSION="1")
    if token is not None:
        env["HF_TOKEN"] = token
    env.update(extra)
    return env


class HubClient:
    """A Python subprocess that runs test code with the Hub client configured by `env`. `run(code, **args)` executes
    `code` with `args` in scope, in one namespace shared by all calls (so `preamble` can import and define helpers),
    and returns the JSON value the code assigns to `result`, or raises `RemoteError`. Its stdout / stderr go to
    `log_dir`."""

    def __init__(self, env: dict[str, str], cwd: Path, log_dir: Path, preamble: str = ""):
        read_fd, write_fd = os.pipe()
        self.log_dir = Path(log_dir)
        self.stdout, self.stderr = self.log_dir / "client.stdout", self.log_dir / "client.stderr"
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-c", WORKER, str(write_fd)], stdin=subprocess.PIPE, stdout=out, stderr=err,
                env=env, cwd=cwd, pass_fds=(write_fd,), text=True,
            )
        os.close(write_fd)
        self.results = os.fdopen(read_fd, "r")
        if preamble:
            self.run(preamble)

    def run(self, code: str, timeout: float = 300, **args):
        self.process.stdin.write(json.dumps({"code": textwrap.dedent(code), "args": args}) + "\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout
        while not select.select([self.results], [], [], 1.0)[0]:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Hub client process stopped answering; stderr:\n{self.output()[-4000:]}")
        answer = json.loads(self.results.readline())
        if not answer["ok"]:
            raise RemoteError(answer)
        return answer["result"]

    def output(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.results.close()

