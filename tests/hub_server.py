"""A tiny in-memory stand-in for the Hugging Face Hub HTTP API, for offline push/load tests.

It speaks just what `huggingface_hub` 2.4 and `transformers` 5.24 call for `push_to_hub`,
`HfApi.create_commit` and `from_pretrained(repo_id, trust_remote_code=True)`:

- POST /api/repos/create                          create a model repo (409 if it exists)
- POST /api/validate-yaml                         README.md metadata check (always valid)
- POST /api/models/{repo}/preupload/{rev}         every file "regular" (base64 in the commit, no LFS/Xet)
- POST /api/models/{repo}/commit/{rev}            NDJSON commit: header (parentCommit checked, 412),
                                                  file (base64), deletedFile/deletedFolder; no lfsFile
- GET  /api/models/{repo}[/revision/{rev}]        model info: sha, siblings
- GET  /api/models/{repo}/tree/{rev}[/{path}]     file listing
- HEAD/GET /{repo}/resolve/{rev}/{path}           file download with ETag, X-Repo-Commit, Content-Length
- GET  /api/whoami-v2                             the dummy user
- GET  /api/agent-harnesses                       huggingface_hub's agent-detection registry (empty)

Missing files answer 404 with `X-Error-Code: EntryNotFound`, missing repos 401 with
`X-Error-Code: RepoNotFound`, as the Hub does. Any other request is answered 404 and recorded in
`server.unknown_requests`, so a test can assert that the client needed nothing more.
Run `python tests/hub_server.py [port]` to try it by hand.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

EMPTY_SHA = "0" * 40
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob: the ETag the Hub gives regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class StaleParentError(Exception):
    """A commit named a parent that is no longer the head of main."""


@dataclass
class Commit:
    sha: str
    message: str
    files: dict[str, bytes]  # full snapshot of the repo at this commit


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1] if self.commits else Commit(EMPTY_SHA, "", {})

    def snapshot(self, revision: str) -> Commit | None:
        if revision == "main":
            return self.head
        return next((c for c in self.commits if c.sha == revision), None)


class HubState:
    """Repos and the request log, shared by the handler threads."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unknown_requests: list[tuple[str, str]] = []

    def create_repo(self, repo_id: str, private: bool = False) -> bool:
        with self.lock:
            if repo_id in self.repos:
                return False
            self.repos[repo_id] = Repo(repo_id, private)
            # Like the Hub, a new repo starts with one commit holding a .gitattributes.
            self.commit(repo_id, "initial commit", {".gitattributes": GITATTRIBUTES})
            return True

    def commit(
        self, repo_id: str, message: str, add: dict[str, bytes], delete: list[str] = (), parent: str | None = None
    ) -> Commit:
        """Apply additions and deletions (a path or a folder prefix ending in "/") on top of main.

        Raises StaleParentError if `parent` is given and main has moved on since.
        """
        with self.lock:
            repo = self.repos[repo_id]
            if parent is not None and parent != repo.head.sha:
                raise StaleParentError(parent)
            files = dict(repo.head.files)
            for path in delete:
                for name in list(files):
                    if name == path.rstrip("/") or name.startswith(path.rstrip("/") + "/"):
                        del files[name]
            files.update(add)
            digest = hashlib.sha1(repo.head.sha.encode() + message.encode())
            for name in sorted(files):
                digest.update(name.encode() + b"\0" + git_blob_sha1(files[name]).encode())
            commit = Commit(digest.hexdigest(), message, files)
            repo.commits.append(commit)
            return commit

    def put_file(self, repo_id: str, path: str, content: bytes, message: str = "Add file") -> Commit:
        """Seed a repo (created if needed) with one file, as if a user had uploaded it."""
        self.create_repo(repo_id)
        return self.commit(repo_id, message, {path: content})

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self.lock:
            return dict(self.repos[repo_id].snapshot(revision).files)


REPO = r"(?P<repo>[^/]+/[^/]+)"
REV = r"(?P<rev>[^/]+)"


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    # --- plumbing ---------------------------------------------------------------------------
    def log_message(self, format, *args):  # keep pytest output clean
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict[str, str] | None = None, head: bool = False):
        self._send(status, json.dumps(payload).encode(), headers, head)

    def _error(self, status: int, code: str | None, message: str, head: bool = False):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers, head)

    def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound", f"Repository not found: {repo_id}", head)
        return repo

    @property
    def state(self) -> HubState:
        return self.server.state

    def _route(self, method: str) -> None:
        path = unquote(urlsplit(self.path).path)
        self.state.requests.append((method, self.path))
        body = self._body() if method == "POST" else b""
        for pattern, handler in self.ROUTES.get(method, []):
            match = re.fullmatch(pattern, path)
            if match:
                try:
                    return handler(self, body=body, **match.groupdict())
                except Exception as error:  # a bug here should show up in the client, not hang it
                    return self._error(500, None, f"{type(error).__name__}: {error}")
        self.state.unknown_requests.append((method, self.path))
        self._error(404, None, f"hub_server: no route for {method} {self.path}", head=method == "HEAD")

    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    # --- endpoints ---------------------------------------------------------------------------
    def agent_harnesses(self, body):  # huggingface_hub's best-effort agent-detection registry: empty
        self._json(200, {"standardEnvVars": [], "harnesses": {}})

    def whoami(self, body):
        self._json(200, {"type": "user", "name": "user", "fullname": "Test User", "orgs": [], "auth": {}})

    def create_repo(self, body):
        payload = json.loads(body or b"{}")
        if payload.get("type", "model") != "model":
            return self._error(400, None, "hub_server only hosts model repos")
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        url = f"{self.server.url}/{repo_id}"
        if not self.state.create_repo(repo_id, payload.get("visibility") == "private"):
            # create_repo(exist_ok=True) swallows the 409 and still reads "url" from the body
            message = "You already created this model repo"
            return self._json(409, {"error": message, "url": url}, {"X-Error-Message": message})
        self._json(200, {"url": url, "name": repo_id})

    def validate_yaml(self, body):
        self._json(200, {"errors": [], "warnings": []})

    def preupload(self, body, repo, rev):
        if self._repo(repo) is None:
            return
        files = self.state.files(repo, rev) if rev == "main" else {}
        result = []
        for item in json.loads(body)["files"]:
            existing = files.get(item["path"])
            result.append(
                {
                    "path": item["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(existing) if existing is not None else None,
                }
            )
        self._json(200, {"files": result, "commitOid": self.state.repos[repo].head.sha})

    def commit(self, body, repo, rev):
        if self._repo(repo) is None:
            return
        if rev != "main":
            return self._error(400, None, "hub_server only commits to main")
        header, add, delete = {}, {}, []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    return self._error(400, None, f"unsupported encoding {value.get('encoding')}")
                add[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                delete.append(value["path"] + ("/" if key == "deletedFolder" else ""))
            else:  # lfsFile would need an LFS/Xet upload first; preupload never asks for one
                return self._error(400, None, f"hub_server does not support commit operation {key!r}")
        try:
            commit = self.state.commit(repo, header.get("summary", ""), add, delete, header.get("parentCommit"))
        except StaleParentError:
            return self._error(412, None, "A commit has happened since. Please refresh and try again.")
        self._json(
            200,
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{self.server.url}/{repo}/commit/{commit.sha}",
                "pullRequestUrl": None,
            },
        )

    def model_info(self, body, repo, rev="main"):
        if self._repo(repo) is None:
            return
        snapshot = self.state.repos[repo].snapshot(rev)
        if snapshot is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        self._json(
            200,
            {
                "_id": repo,
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": snapshot.sha,
                "private": self.state.repos[repo].private,
                "disabled": False,
                "gated": False,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "siblings": [{"rfilename": name} for name in sorted(snapshot.files)],
            },
        )

    def tree(self, body, repo, rev, subpath=None):
        if self._repo(repo) is None:
            return
        snapshot = self.state.repos[repo].snapshot(rev)
        if snapshot is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        prefix = (subpath.strip("/") + "/") if subpath else ""
        entries = [
            {"type": "file", "oid": git_blob_sha1(content), "size": len(content), "path": name}
            for name, content in sorted(snapshot.files.items())
            if name.startswith(prefix)
        ]
        self._json(200, entries)

    def resolve(self, body, repo, rev, path, head=False):
        if self._repo(repo, head) is None:
            return
        snapshot = self.state.repos[repo].snapshot(rev)
        if snapshot is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        headers = {"X-Repo-Commit": snapshot.sha}
        if path not in snapshot.files:
            return self._send(
                404,
                b"Entry not found",
                headers | {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"},
                head,
            )
        content = snapshot.files[path]
        status = 200
        headers |= {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha1(content)}"',
            "Accept-Ranges": "bytes",
        }
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match and not head:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(content) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content, status = content[start : end + 1], 206
        self._send(status, content, headers, head)

    def resolve_head(self, body, repo, rev, path):
        self.resolve(body, repo, rev, path, head=True)

    ROUTES = {
        "GET": [
            (r"/api/whoami-v2", whoami),
            (r"/api/agent-harnesses", agent_harnesses),
            (rf"/api/models/{REPO}", model_info),
            (rf"/api/models/{REPO}/revision/{REV}", model_info),
            (rf"/api/models/{REPO}/tree/{REV}(?:/(?P<subpath>.*))?", tree),
            (rf"/{REPO}/resolve/{REV}/(?P<path>.+)", resolve),
        ],
        "HEAD": [(rf"/{REPO}/resolve/{REV}/(?P<path>.+)", resolve_head)],
        "POST": [
            (r"/api/repos/create", create_repo),
            (r"/api/validate-yaml", validate_yaml),
            (rf"/api/models/{REPO}/preupload/{REV}", preupload),
            (rf"/api/models/{REPO}/commit/{REV}", commit),
        ],
    }


class HubServer(ThreadingHTTPServer):
    """`HubServer(port=0)` serves on 127.0.0.1 in a daemon thread; use as a context manager."""

    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), HubHandler)
        self.state = HubState()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


if __name__ == "__main__":
    import sys
    import time

    with HubServer(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0) as server:
        print(f"serving a fake Hub on {server.url} (HF_ENDPOINT={server.url})", flush=True)
        try:
            while True:
                time.sleep(1)
                for request in server.state.unknown_requests:
                    print("unknown request:", *request, flush=True)
                server.state.unknown_requests.clear()
        except KeyboardInterrupt:
            pass
