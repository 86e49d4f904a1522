"""A loopback fake of the Hugging Face Hub that the real ``huggingface_hub`` client (2.x) talks to.

Two stdlib ``ThreadingHTTPServer``s on ``127.0.0.1``, port 0: the Hub API and a "CDN" that serves
LFS-style blobs (a different origin, so the client drops the ``Authorization`` header when it
follows the redirect, exactly as with huggingface.co). Nothing is reachable from outside loopback.

Upload side (what ``HfApi.create_repo`` / ``create_branch`` / ``upload_folder`` send):

- ``POST /api/repos/create`` -> ``{"url"}``; an existing repo answers 409 with ``url`` in the body. A new
  repo gets an initial commit holding ``.gitattributes``, as on the Hub.
- ``POST /api/validate-yaml`` -> 400 with ``errors`` if the README front matter is not a YAML mapping.
- ``POST /api/models/{ns}/{name}/preupload/{rev}`` -> ``"regular"`` for every file (no LFS/Xet upload
  needed), with the remote blob oid so the client skips unchanged files.
- ``POST /api/models/{ns}/{name}/commit/{rev}`` (ndjson: header, file, deletedFile, deletedFolder);
  ``?create_pr=1`` opens ``refs/pr/N``. ``POST .../discussions`` (``pullRequest: true``) +
  ``GET .../discussions/{n}`` for ``upload_folder(create_pr=True)``. ``POST .../branch/{name}``.

Download side (``snapshot_download`` / ``hf_hub_download``): ``GET /api/models/{ns}/{name}[/revision/{rev}]``
(``sha``, ``siblings``, ``private``, ``cardData``), ``GET .../tree/{rev}[/{path}]`` (paginated with a
``Link`` header), ``GET .../refs``, and ``HEAD/GET /{ns}/{name}/resolve/{rev}/{path}``: regular files
answer 200 with ``ETag`` (git blob sha1), ``X-Repo-Commit``, ``Content-Length`` (Range supported);
LFS-style files (``*.safetensors``, images, ... or >= 10 MiB) answer 302 to the CDN with
``X-Linked-Etag`` (sha256), ``X-Linked-Size`` and ``X-Repo-Commit``.

Auth: ``FakeHub(token="hf_...")`` makes writes need that bearer token and rejects any other token
with 401 "Invalid credentials in Authorization header"; private repos are invisible (404
``RepoNotFound``) without it. ``FakeHub()`` accepts any token. ``hub.inject(status, ...)`` makes matching
requests fail. Every request is recorded in ``hub.requests`` (headers included, so a test can see the
token arrived); the fake itself never prints anything.

Use::

    from hubfake import FakeHub
    with FakeHub(token="hf_test") as hub:
        HfApi(endpoint=hub.endpoint, token="hf_test").create_repo("user/x")

``use_as_default_endpoint(monkeypatch, hub)`` points calls made without ``endpoint=`` (diffusers'
``from_pretrained``, ``hf_hub_download``) at the fake. Tests take a started hub from the ``fake_hub``
fixture (``conftest.py``), which also isolates huggingface_hub from the developer's own login
(``HF_TOKEN``, token file) and turns telemetry off.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import itertools
import json
import re
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    b"*.png filter=lfs diff=lfs merge=lfs -text\n"
)
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".npz", ".png", ".jpg", ".mp4", ".gif",
)
LFS_MIN_SIZE = 10 * 1024 * 1024
TREE_PAGE_SIZE = 1000
_YAML_BLOCK = re.compile(r"^\s*---\r?\n([\s\S]*?)\r?\n---[ \t]*(\r?\n|$)")


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's ``oid``/``ETag``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    description: str
    files: dict[str, bytes]
    created_at: str = field(default_factory=_now)


@dataclass
class PullRequest:
    num: int
    title: str
    description: str
    is_pull_request: bool
    ref: str | None
    created_at: str = field(default_factory=_now)


@dataclass
class Repo:
    """One model repo: commits by oid, refs (branch names, ``refs/pr/N``) to commit oids."""

    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    discussions: dict[int, PullRequest] = field(default_factory=dict)
    created_at: str = field(default_factory=_now)

    def resolve(self, revision: str | None) -> Commit | None:
        """The commit a branch name, ``refs/heads/x``, ``refs/pr/N`` or commit oid points to."""
        rev = revision or "main"
        if rev.startswith("refs/heads/"):
            rev = rev[len("refs/heads/"):]
        if rev in self.refs:
            return self.commits[self.refs[rev]]
        return self.commits.get(rev)

    @property
    def prs(self) -> dict[int, PullRequest]:
        return {n: d for n, d in self.discussions.items() if d.is_pull_request}


@dataclass
class RecordedRequest:
    server: str  # "hub" or "cdn"
    method: str
    path: str  # unquoted path, no query
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body_size: int
    status: int = 0

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclass
class _Rule:
    status: int
    path: re.Pattern | None
    method: str | None
    remaining: int | None
    message: str


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, body=None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}
        self.body = body


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, hub: FakeHub, role: str):
        self.hub, self.role = hub, role
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request, client_address) -> None:  # a client hanging up is not news
        self.hub.connection_errors += 1

    def close_connections(self) -> None:
        """Cut open keep-alive connections, so a client's pooled connection can never reach a stopped
        fake through a port the OS hands to the next one."""
        with self.connections_lock:
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def verify_request(self, request, client_address) -> bool:  # loopback peers only
        try:
            return ipaddress.ip_address(client_address[0]).is_loopback
        except ValueError:
            return False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection never pins a thread for long
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # silence: never echo headers anywhere
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ------------------------------------------------------------------ plumbing
    def _read_body(self, hub: FakeHub) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                total += size
                if total > hub.max_body:
                    raise _HttpError(413, "request body too large for the fake hub")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > hub.max_body:
            self.close_connection = True
            raise _HttpError(413, "request body too large for the fake hub")
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        raw_segments = [s for s in split.path.split("/") if s]
        segments = [unquote(s) for s in raw_segments]
        rec = RecordedRequest(
            server=self.server.role,
            method=method,
            path=unquote(split.path),
            query=parse_qs(split.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in self.headers.items()},
            body_size=int(self.headers.get("Content-Length") or 0),
        )
        hub._record(rec)
        try:
            body = self._read_body(hub)
            if hub._over_budget():
                self.close_connection = True
                raise _HttpError(503, "fake hub request budget exhausted (request loop?)")
            rule = hub._match_rule(method, rec.path)
            if rule is not None:
                raise _HttpError(rule.status, rule.message)
            with hub._lock:
                if self.server.role == "cdn":
                    status, headers, payload = self._cdn(method, segments)
                else:
                    status, headers, payload = _route(hub, self, method, segments, rec.query, body)
        except _HttpError as e:
            status = e.status
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            payload = e.body if e.body is not None else {"error": e.message}
        except Exception as e:  # a bug in the fake: answer 500, keep serving
            status, headers, payload = 500, {"X-Error-Message": "fake hub internal error"}, {
                "error": f"fake hub internal error: {type(e).__name__}: {e}"
            }
        rec.status = status
        self._send(method, status, headers, payload)

    def _send(self, method: str, status: int, headers: dict, payload: Any) -> None:
        if isinstance(payload, (dict, list)):
            data = json.dumps(payload).encode()
            headers.setdefault("Content-Type", "application/json; charset=utf-8")
        else:
            data = payload or b""
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if method != "HEAD" and data:
            self.wfile.write(data)

    def _cdn(self, method: str, segments: list[str]) -> tuple[int, dict, Any]:
        hub = self.server.hub
        if method not in ("GET", "HEAD") or len(segments) != 2 or segments[0] != "lfs":
            raise _HttpError(404, "not found")
        data = hub._lfs_blobs.get(segments[1])
        if data is None:
            raise _HttpError(404, "blob not found")
        headers = {"ETag": f'"{segments[1]}"', "Content-Type": "application/octet-stream"}
        return _ranged(self.headers.get("Range"), data, headers)


def _ranged(range_header: str | None, data: bytes, headers: dict) -> tuple[int, dict, bytes]:
    headers["Accept-Ranges"] = "bytes"
    if not range_header:
        return 200, headers, data
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())
    size = len(data)
    if not m or (not m.group(1) and not m.group(2)):
        raise _HttpError(416, "bad range", headers={"Content-Range": f"bytes */{size}"})
    if m.group(1):
        start = int(m.group(1))
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    else:
        start, end = max(size - int(m.group(2)), 0), size - 1
    if start >= size or start > end:
        raise _HttpError(416, "range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return 206, headers, data[start : end + 1]


# ---------------------------------------------------------------------- routes (hub server)
def _route(hub: FakeHub, h: _Handler, method: str, seg: list[str], query: dict, body: bytes):
    auth = hub._auth(h.headers.get("Authorization"))
    if auth == "invalid":
        raise _HttpError(401, "Invalid credentials in Authorization header")
    if seg[:1] == ["api"]:
        if seg[1:] == ["repos", "create"] and method == "POST":
            return hub._create_repo(_json(body), auth)
        if seg[1:] == ["validate-yaml"] and method == "POST":
            return hub._validate_yaml(_json(body))
        if seg[1:] == ["agent-harnesses"] and method == "GET":  # user-agent detection registry
            return 200, {}, {"standardEnvVars": [], "harnesses": {}}
        if seg[1:] == ["whoami-v2"] and method == "GET":
            if auth != "valid":
                raise _HttpError(401, "Invalid credentials in Authorization header")
            return 200, {}, {"type": "user", "name": hub.namespace, "auth": {"type": "access_token"}}
        if len(seg) >= 4 and seg[1] == "models":
            repo_id = f"{seg[2]}/{seg[3]}"
            rest = seg[4:]
            repo = hub._visible_repo(repo_id, auth)
            write = method in ("POST", "PUT", "DELETE")
            if write and auth != "valid":
                raise _HttpError(401, "You must be authenticated to write to this repo")
            if not rest and method == "GET":
                return hub._info(repo, None, query)
            if rest[:1] == ["revision"] and len(rest) >= 2 and method == "GET":
                return hub._info(repo, "/".join(rest[1:]), query)
            if rest[:1] == ["tree"] and len(rest) >= 2 and method == "GET":
                return hub._tree(repo, rest[1], "/".join(rest[2:]), query)
            if rest == ["refs"] and method == "GET":
                return hub._refs(repo, query)
            if rest[:1] == ["preupload"] and len(rest) >= 2 and method == "POST":
                return hub._preupload(repo, "/".join(rest[1:]), _json(body))
            if rest[:1] == ["commit"] and len(rest) >= 2 and method == "POST":
                return hub._commit(repo, "/".join(rest[1:]), body, query)
            if rest[:1] == ["branch"] and len(rest) >= 2 and method == "POST":
                return hub._create_branch(repo, "/".join(rest[1:]), _json(body) if body else {})
            if rest == ["discussions"] and method == "POST":
                return hub._create_discussion(repo, _json(body))
            if rest[:1] == ["discussions"] and len(rest) == 2 and method == "GET":
                return hub._discussion(repo, rest[1])
        raise _HttpError(404, f"fake hub: no route for {method} /{'/'.join(seg)}")
    if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
        repo = hub._visible_repo(f"{seg[0]}/{seg[1]}", auth)
        return hub._resolve(repo, seg[3], "/".join(seg[4:]), h.headers.get("Range"))
    raise _HttpError(404, f"fake hub: no route for {method} /{'/'.join(seg)}")


def _json(body: bytes) -> dict:
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise _HttpError(400, "body is not JSON") from None
    if not isinstance(data, dict):
        raise _HttpError(400, "body must be a JSON object")
    return data


def _check_path(path: Any) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        raise _HttpError(400, f"invalid path in repo: {path!r}")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise _HttpError(400, f"invalid path in repo: {path!r}")
    return path


class FakeHub:
    """The fake Hub: start with ``with FakeHub() as hub:`` (or ``start()``/``stop()``).

    Args:
        token: a bearer token (or several) the fake accepts; ``None`` accepts any token and lets
            anonymous clients write too.
        namespace: the user that owns repos created without an organization.
        lfs_suffixes / lfs_min_size: which files the download side serves LFS-style (302 to the CDN).
        max_requests: after this many requests the fake answers 503 (stops a runaway client loop).
        max_body: largest request body accepted (bytes).
    """

    def __init__(
        self,
        *,
        token: str | Iterable[str] | None = None,
        namespace: str = "user",
        lfs_suffixes: tuple[str, ...] = LFS_SUFFIXES,
        lfs_min_size: int = LFS_MIN_SIZE,
        max_requests: int = 10_000,
        max_body: int = 512 * 1024 * 1024,
    ):
        self.tokens: set[str] = {token} if isinstance(token, str) else set(token or ())
        self.namespace = namespace
        self.lfs_suffixes = lfs_suffixes
        self.lfs_min_size = lfs_min_size
        self.max_requests = max_requests
        self.max_body = max_body
        self.repos: dict[str, Repo] = {}
        self.requests: list[RecordedRequest] = []
        self.validated_yaml: list[str] = []
        self.connection_errors = 0
        self._rules: list[_Rule] = []
        self._lfs_blobs: dict[str, bytes] = {}
        self._lock = threading.RLock()
        self._record_lock = threading.Lock()
        self._seq = itertools.count(1)
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakeHub:
        if self._servers:
            return self
        for role in ("hub", "cdn"):
            server = _Server(self, role)
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"fakehub-{role}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
            server.close_connections()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers, self._threads = [], []

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``: pass as ``endpoint=`` / ``HF_ENDPOINT``."""
        if not self._servers:
            raise RuntimeError("FakeHub is not started")
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn_endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    # ------------------------------------------------------------------ test helpers
    def inject(self, status: int, *, path: str | None = None, method: str | None = None,
               times: int | None = None, message: str | None = None) -> None:
        """Answer ``status`` to requests whose unquoted path matches regex ``path`` (``re.search``) and
        ``method``; ``times`` bounds how often (``None``: until :meth:`clear_injections`)."""
        if message is None:
            message = "Invalid credentials in Authorization header" if status == 401 else f"injected error {status}"
        with self._lock:
            self._rules.append(_Rule(status, re.compile(path) if path else None, method, times, message))

    def clear_injections(self) -> None:
        with self._lock:
            self._rules.clear()

    def repo(self, repo_id: str) -> Repo:
        return self.repos[repo_id]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (``{path: bytes}``); KeyError if unknown."""
        with self._lock:
            commit = self.repos[repo_id].resolve(revision)
            if commit is None:
                raise KeyError(revision)
            return dict(commit.files)

    def add_repo(self, repo_id: str, *, private: bool = False, files: dict[str, bytes] | None = None) -> Repo:
        """Create a repo directly (no HTTP), optionally with a first commit of ``files``."""
        with self._lock:
            repo = self._new_repo(repo_id, private)
            if files:
                self._make_commit(repo, "main", {**repo.resolve("main").files, **files}, "seed", "")
            return repo

    def requests_to(self, pattern: str, method: str | None = None) -> list[RecordedRequest]:
        """Recorded requests whose path matches regex ``pattern`` (and ``method``)."""
        with self._record_lock:
            return [r for r in self.requests if re.search(pattern, r.path) and (method is None or r.method == method)]

    # ------------------------------------------------------------------ internals
    def _record(self, rec: RecordedRequest) -> None:
        with self._record_lock:
            self.requests.append(rec)

    def _over_budget(self) -> bool:
        with self._record_lock:
            return len(self.requests) > self.max_requests

    def _match_rule(self, method: str, path: str) -> _Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.remaining == 0:
                    continue
                if rule.method and rule.method != method:
                    continue
                if rule.path and not rule.path.search(path):
                    continue
                if rule.remaining is not None:
                    rule.remaining -= 1
                return rule
        return None

    def _auth(self, header: str | None) -> str:
        """'valid', 'anonymous' or 'invalid' for an Authorization header."""
        if not header:
            return "valid" if not self.tokens else "anonymous"
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value:
            return "invalid"
        if not self.tokens or value.strip() in self.tokens:
            return "valid"
        return "invalid"

    def _visible_repo(self, repo_id: str, auth: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and auth != "valid"):
            raise _HttpError(404, "Repository not found", code="RepoNotFound")
        return repo

    def _url(self, repo_id: str) -> str:
        return f"{self.endpoint}/{repo_id}"

    def _new_repo(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id=repo_id, private=private)
        self.repos[repo_id] = repo
        self._make_commit(repo, "main", {".gitattributes": GITATTRIBUTES}, "initial commit", "")
        return repo

    def _make_commit(self, repo: Repo, ref: str, files: dict[str, bytes], message: str, description: str) -> Commit:
        parent = repo.refs.get(ref)
        tree = sorted((path, git_blob_oid(data)) for path, data in files.items())
        seed = json.dumps([repo.repo_id, parent, message, tree, next(self._seq)]).encode()
        commit = Commit(oid=hashlib.sha1(seed).hexdigest(), parent=parent, message=message,
                        description=description, files=files)
        repo.commits[commit.oid] = commit
        repo.refs[ref] = commit.oid
        return commit

    def _is_lfs(self, path: str, data: bytes) -> bool:
        return path.lower().endswith(self.lfs_suffixes) or len(data) >= self.lfs_min_size

    def _commit_or_404(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HttpError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return commit

    # ------------------------------------------------------------------ upload side
    def _create_repo(self, payload: dict, auth: str):
        if auth != "valid":
            raise _HttpError(401, "You must be authenticated to create a repo")
        name, org = payload.get("name"), payload.get("organization")
        repo_type = payload.get("type") or "model"
        if repo_type != "model":
            raise _HttpError(400, f"fake hub only hosts model repos, not {repo_type!r}")
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]{1,96}", name):
            raise _HttpError(400, f"invalid repo name {name!r}")
        repo_id = f"{org or self.namespace}/{name}"
        if repo_id in self.repos:
            raise _HttpError(409, "You already created this model repo",
                             body={"error": "You already created this model repo", "url": self._url(repo_id)})
        private = payload.get("visibility") == "private" or payload.get("private") is True
        self._new_repo(repo_id, private)
        return 200, {}, {"url": self._url(repo_id), "name": repo_id, "id": repo_id}

    def _validate_yaml(self, payload: dict):
        content = payload.get("content")
        if not isinstance(content, str):
            raise _HttpError(400, "content must be a string")
        self.validated_yaml.append(content)
        match = _YAML_BLOCK.match(content)
        errors = []
        if match:
            try:
                data = yaml.safe_load(match.group(1))
                if data is not None and not isinstance(data, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {str(e).splitlines()[0]}"})
        warnings = [] if match else [{"message": "empty or missing yaml metadata in repo card"}]
        if errors:
            raise _HttpError(400, "Invalid metadata in README.md", body={"errors": errors, "warnings": warnings})
        return 200, {}, {"errors": [], "warnings": warnings}

    def _preupload(self, repo: Repo, revision: str, payload: dict):
        commit = self._commit_or_404(repo, revision)
        files = payload.get("files")
        if not isinstance(files, list):
            raise _HttpError(400, "files must be a list")
        out = []
        for item in files:
            path = _check_path(item.get("path") if isinstance(item, dict) else None)
            existing = commit.files.get(path)
            out.append({"path": path, "uploadMode": "regular", "shouldIgnore": False,
                        "oid": git_blob_oid(existing) if existing is not None else None})
        return 200, {}, {"files": out, "commitOid": commit.oid}

    def _commit(self, repo: Repo, revision: str, body: bytes, query: dict):
        create_pr = query.get("create_pr", [""])[0] in ("1", "true")
        base = self._commit_or_404(repo, revision)
        target = revision[len("refs/heads/"):] if revision.startswith("refs/heads/") else revision
        if not create_pr and target not in repo.refs:
            raise _HttpError(400, f"cannot commit to {revision!r}: not a branch or pull request ref")
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except ValueError:
            raise _HttpError(400, "commit payload is not ndjson") from None
        if not lines or lines[0].get("key") != "header":
            raise _HttpError(400, "commit payload must start with a header line")
        header = lines[0].get("value") or {}
        parent = header.get("parentCommit")
        if parent and not base.oid.startswith(parent):
            raise _HttpError(412, f"parent commit {parent} is not the head of {revision}")
        files = dict(base.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            if key == "file":
                path = _check_path(value.get("path"))
                if value.get("encoding") not in (None, "base64"):
                    raise _HttpError(400, f"unsupported encoding {value.get('encoding')!r}")
                try:
                    files[path] = base64.b64decode(value.get("content", ""), validate=True)
                except ValueError:
                    raise _HttpError(400, f"bad base64 content for {path}") from None
            elif key == "deletedFile":
                files.pop(_check_path(value.get("path")), None)
            elif key == "deletedFolder":
                prefix = _check_path(value.get("path").rstrip("/")) + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            elif key == "lfsFile":
                raise _HttpError(422, "fake hub: LFS uploads are not supported (preupload answers 'regular')")
            else:
                raise _HttpError(400, f"unsupported commit operation {key!r}")
        pr_url = None
        if create_pr:
            num = self._next_discussion_num(repo)
            target = f"refs/pr/{num}"
            repo.refs[target] = base.oid
            repo.discussions[num] = PullRequest(num, header.get("summary", ""), header.get("description", ""),
                                                True, target)
            pr_url = f"{self._url(repo.repo_id)}/discussions/{num}"
        commit = self._make_commit(repo, target, files, header.get("summary", ""), header.get("description", ""))
        for path, data in files.items():
            if self._is_lfs(path, data):
                self._lfs_blobs[hashlib.sha256(data).hexdigest()] = data
        return 200, {}, {
            "success": True,
            "commitUrl": f"{self._url(repo.repo_id)}/commit/{commit.oid}",
            "commitOid": commit.oid,
            "pullRequestUrl": pr_url,
        }

    def _create_branch(self, repo: Repo, branch: str, payload: dict):
        if branch.startswith("refs/") or branch in repo.refs:
            if branch in repo.refs:
                raise _HttpError(409, f"Reference already exists: {branch}")
            raise _HttpError(400, f"Invalid reference for a branch: {branch}")
        start = self._commit_or_404(repo, payload.get("startingPoint") or "main")
        repo.refs[branch] = start.oid
        return 200, {}, {}

    def _next_discussion_num(self, repo: Repo) -> int:
        return max(repo.discussions, default=0) + 1

    def _create_discussion(self, repo: Repo, payload: dict):
        num = self._next_discussion_num(repo)
        is_pr = bool(payload.get("pullRequest"))
        ref = f"refs/pr/{num}" if is_pr else None
        if ref:
            repo.refs[ref] = repo.refs["main"]
        repo.discussions[num] = PullRequest(num, str(payload.get("title", "")), str(payload.get("description", "")),
                                            is_pr, ref)
        return 200, {}, {"num": num, "pullRequest": is_pr, "url": f"{self._url(repo.repo_id)}/discussions/{num}"}

    def _discussion(self, repo: Repo, num: str):
        d = repo.discussions.get(int(num)) if num.isdigit() else None
        if d is None:
            raise _HttpError(404, "Discussion not found")
        return 200, {}, {
            "num": d.num,
            "title": d.title,
            "author": {"name": self.namespace},
            "createdAt": d.created_at,
            "status": "draft" if d.is_pull_request else "open",
            "repo": {"name": repo.repo_id, "type": "model"},
            "isPullRequest": d.is_pull_request,
            "events": [{
                "id": f"{d.num:024x}", "type": "comment", "createdAt": d.created_at,
                "author": {"name": self.namespace},
                "data": {"edited": False, "hidden": False, "latest": {"raw": d.description}},
            }],
            "changes": {"base": "refs/heads/main"},
            "filesWithConflicts": [],
            "diff": "",
        }

    # ------------------------------------------------------------------ download side
    def _info(self, repo: Repo, revision: str | None, query: dict):
        commit = self._commit_or_404(repo, revision or "main")
        blobs = query.get("blobs", [""])[0].lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            entry: dict[str, Any] = {"rfilename": path}
            if blobs:
                data = commit.files[path]
                entry.update(size=len(data), blobId=git_blob_oid(data))
                if self._is_lfs(path, data):
                    sha = hashlib.sha256(data).hexdigest()
                    entry["lfs"] = {"sha256": sha, "size": len(data), "pointerSize": len(_lfs_pointer(sha, len(data)))}
            siblings.append(entry)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.created_at,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(d) for d in commit.files.values()),
        }
        readme = commit.files.get("README.md")
        match = _YAML_BLOCK.match(readme.decode("utf-8", "replace")) if readme else None
        if match:
            try:
                card = yaml.safe_load(match.group(1))
            except yaml.YAMLError:
                card = None
            if isinstance(card, dict):
                info["cardData"] = card
                info["tags"] = list(card.get("tags") or [])
                for key in ("library_name", "pipeline_tag"):
                    if card.get(key):
                        info[key] = card[key]
        return 200, {}, info

    def _tree(self, repo: Repo, revision: str, path: str, query: dict):
        commit = self._commit_or_404(repo, revision)
        recursive = query.get("recursive", [""])[0].lower() in ("1", "true")
        prefix = f"{path.strip('/')}/" if path else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise _HttpError(404, f"{path} does not exist on {revision}", code="EntryNotFound")
        entries: dict[str, dict] = {}
        for file_path in sorted(commit.files):
            if not file_path.startswith(prefix):
                continue
            rel_parts = file_path[len(prefix):].split("/")
            # directories on the way
            for depth in range(1, len(rel_parts)):
                if not recursive and depth > 1:
                    break
                dir_path = prefix + "/".join(rel_parts[:depth])
                entries.setdefault(dir_path, {
                    "type": "directory", "path": dir_path, "size": 0,
                    "oid": hashlib.sha1(f"{commit.oid}:{dir_path}".encode()).hexdigest(),
                })
            if not recursive and len(rel_parts) > 1:
                continue
            data = commit.files[file_path]
            entry: dict[str, Any] = {"type": "file", "path": file_path, "size": len(data), "oid": git_blob_oid(data)}
            if self._is_lfs(file_path, data):
                sha = hashlib.sha256(data).hexdigest()
                entry["lfs"] = {"oid": sha, "size": len(data), "pointerSize": len(_lfs_pointer(sha, len(data)))}
            entries[file_path] = entry
        listing = [entries[k] for k in sorted(entries)]
        cursor = int(query.get("cursor", ["0"])[0] or 0)
        page = listing[cursor : cursor + TREE_PAGE_SIZE]
        headers = {}
        if cursor + TREE_PAGE_SIZE < len(listing):
            qs = f"recursive={str(recursive).lower()}&cursor={cursor + TREE_PAGE_SIZE}"
            url = f"{self.endpoint}/api/models/{repo.repo_id}/tree/{quote(revision, safe='')}"
            if path:
                url += "/" + quote(path, safe="")
            headers["Link"] = f'<{url}?{qs}>; rel="next"'
        return 200, headers, page

    def _refs(self, repo: Repo, query: dict):
        def ref(name: str, full: str) -> dict:
            return {"name": name, "ref": full, "targetCommit": repo.refs[name]}

        out: dict[str, Any] = {
            "branches": [ref(n, f"refs/heads/{n}") for n in sorted(repo.refs) if not n.startswith("refs/")],
            "converts": [],
            "tags": [],
        }
        if query.get("include_prs", [""])[0] in ("1", "true"):
            out["pullRequests"] = [ref(n, n) for n in sorted(repo.refs) if n.startswith("refs/pr/")]
        return 200, {}, out

    def _resolve(self, repo: Repo, revision: str, path: str, range_header: str | None):
        commit = self._commit_or_404(repo, revision)
        data = commit.files.get(path)
        if data is None:
            raise _HttpError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        headers: dict[str, Any] = {"X-Repo-Commit": commit.oid, "Content-Type": "application/octet-stream"}
        if self._is_lfs(path, data):
            sha = hashlib.sha256(data).hexdigest()
            self._lfs_blobs.setdefault(sha, data)
            pointer = _lfs_pointer(sha, len(data))
            headers.update({
                "Location": f"{self.cdn_endpoint}/lfs/{sha}",
                "ETag": f'"{git_blob_oid(pointer)}"',
                "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": str(len(data)),
            })
            return 302, headers, b""
        headers["ETag"] = f'"{git_blob_oid(data)}"'
        return _ranged(range_header, data, headers)


def isolate_hf_env(monkeypatch, tmp_path) -> None:
    """Keep huggingface_hub away from the developer's login and caches for one test.

    Unsets ``HF_TOKEN``-style variables and offline/endpoint variables, points the token file
    huggingface_hub reads (``constants.HF_TOKEN_PATH``, read at call time) into ``tmp_path``, and
    turns telemetry off (else the client fetches an "agent harness" list from huggingface.co).
    The download cache (``constants.HF_HUB_CACHE``, used when no ``cache_dir=`` is given) moves
    to ``tmp_path/hf-home/hub``.
    """
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # downloads without cache_dir= (slaconv.from_pretrained, diffusers) land in tmp_path, not ~/.cache
    cache = str(tmp_path / "hf-home" / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    # Telemetry on means every request header build asks huggingface.co once per process for the
    # "agent harness" registry: keep tests hermetic.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)


def use_as_default_endpoint(monkeypatch, hub: FakeHub) -> None:
    """Make ``hub`` the endpoint of every huggingface_hub call that gets no ``endpoint=``.

    huggingface_hub reads ``HF_ENDPOINT`` once, at import, into ``constants.ENDPOINT`` and
    ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (and the module-level ``HfApi`` behind
    ``huggingface_hub.model_info`` & co.); setting the variable later has no effect. This patches
    all three (and sets ``HF_ENDPOINT`` for subprocesses), so code that calls ``hf_hub_download``,
    ``snapshot_download`` or diffusers' ``from_pretrained`` with a bare repo id reaches the fake.
    """
    from huggingface_hub import constants, hf_api

    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    # module-level helpers (`huggingface_hub.model_info`, used by diffusers for sharded checkpoints)
    # are bound to one HfApi built at import time
    monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    template = hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)

