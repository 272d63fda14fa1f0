"""A local server speaking the subset of the Hugging Face Hub HTTP protocol that `huggingface_hub` uses to
create a repository, upload a folder in one commit (preupload + NDJSON commit, files inline) and download
it back (revision info, HEAD/GET resolve). It keeps everything in memory and records each request, so tests
can check what was uploaded, whether a repository is private, and that the token travelled only in headers.
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1] if self.commits else "0" * 40


class HubState:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        self.valid_tokens: set[str] | None = None  # None: any token is accepted; else a write needs one of them


class HubHandler(BaseHTTPRequestHandler):
    state: HubState  # set on the subclass made by `start_hub_server`

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, head: bool = False):
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json"}, head)

    def _error(self, status: int, message: str, code: str | None = None):
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _repo(self, repo_id: str) -> Repo | None:
        """The repository, or None after answering 404 as the Hub does."""
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
        return repo

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

    def _record(self, body: bytes = b""):
        with self.state.lock:
            self.state.requests.append((self.command, self.path, dict(self.headers), body))

    def _refused(self) -> bool:
        """Answer 401 as the Hub does when a write comes without a valid token."""
        given = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        if self.state.valid_tokens is None or given in self.state.valid_tokens:
            return False
        self._error(401, "Invalid credentials in Authorization header")
        return True

    def do_POST(self):
        body = self._body()
        self._record(body)
        if self._refused():
            return
        if self.path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            with self.state.lock:
                if repo_id not in self.state.repos:
                    private = payload.get("visibility") == "private" or bool(payload.get("private"))
                    self.state.repos[repo_id] = Repo(private=private)
            return self._json(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id, "id": repo_id})
        if self.path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            parts = content.split("---")
            try:
                metadata = yaml.safe_load(parts[1]) if content.startswith("---") and len(parts) > 2 else None
            except yaml.YAMLError as error:
                return self._json(400, {"errors": [{"message": str(error)}]})
            if not isinstance(metadata, dict):
                return self._json(200, {"warnings": [{"message": "empty or missing metadata"}]})
            return self._json(200, {"warnings": []})
        match = re.fullmatch(r"/api/models/(.+)/(preupload|commit)/([^/]+)", self.path)
        if not match:
            return self._error(404, f"unknown route {self.path}")
        repo_id, action, _ = match.groups()
        repo = self._repo(repo_id)
        if repo is None:
            return
        if action == "preupload":
            files = json.loads(body)["files"]
            return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        added = {}
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                value = item["value"]
                added[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "deletedFile":
                added[item["value"]["path"]] = None
        with self.state.lock:
            for path, content in added.items():
                if content is None:
                    repo.files.pop(path, None)
                else:
                    repo.files[path] = content
            sha = hashlib.sha1(repr(sorted(repo.files)).encode() + str(len(repo.commits)).encode()).hexdigest()
            repo.commits.append(sha)
        host = self.headers["Host"]
        return self._json(200, {"commitUrl": f"http://{host}/{repo_id}/commit/{sha}", "commitOid": sha,
                                "pullRequestUrl": None})

    def do_GET(self):
        self._get(head=False)

    def do_HEAD(self):
        self._get(head=True)

    def _get(self, head: bool):
        self._record()
        match = re.fullmatch(r"/api/models/(.+?)/tree/([^/?]+)(?:\?.*)?", self.path)
        if match:
            repo = self._repo(match.group(1))
            if repo is None:
                return
            entries = [{"type": "file", "path": name, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
                       for name, content in sorted(repo.files.items())]
            return self._json(200, entries, head)
        match = re.fullmatch(r"/api/models/(.+?)(?:/revision/([^/?]+))?(?:\?.*)?", self.path)
        if match and "/resolve/" not in self.path:
            repo_id = match.group(1)
            repo = self._repo(repo_id)
            if repo is None:
                return
            return self._json(200, {
                "id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": repo.private,
                "siblings": [{"rfilename": name} for name in sorted(repo.files)],
            }, head)
        match = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", self.path)
        if not match:
            return self._error(404, f"unknown route {self.path}")
        repo_id, _, filename = match.groups()
        repo = self._repo(repo_id)
        if repo is None:
            return
        if filename not in repo.files:
            return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.sha}, head)
        content = repo.files[filename]
        etag = hashlib.sha256(content).hexdigest()
        self._send(200, content, {"ETag": f'"{etag}"', "X-Repo-Commit": repo.sha,
                                  "Content-Type": "application/octet-stream"}, head)


def start_hub_server() -> tuple[ThreadingHTTPServer, HubState, str]:
    """Start the server on a free loopback port; returns `(server, state, endpoint)`."""
    state = HubState()
    handler = type("BoundHubHandler", (HubHandler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state, f"http://127.0.0.1:{server.server_address[1]}"
