"""A local stand-in of the Hugging Face Hub HTTP API on 127.0.0.1, for tests of publishing and downloading.

It answers what huggingface_hub 2.4's real client sends (read from hf_api.py, _commit_api.py, _upload_pipeline.py,
file_download.py and _snapshot_download.py) for:
    create_repo           POST /api/repos/create                              (401 bad token, 409 exists)
    create_branch         POST /api/models/{repo}/branch/{branch}
    upload_folder         POST /api/models/{repo}/preupload/{rev}   -> every file "regular" (inline in the commit)
                          POST /api/models/{repo}/commit/{rev}      NDJSON: header, file (base64), deletedFile
    upload_folder, both paths   POST /api/validate-yaml               (only checks the YAML block is a mapping)
    with lfs=True (only for a client without hf_xet, which then takes the legacy LFS path) *.safetensors are "lfs":
                          POST /{repo}.git/info/lfs/objects/batch, PUT /lfs-upload/{oid}, POST /lfs-verify,
                          and the commit references them as lfsFile (sha256)
    repo_info/model_info  GET  /api/models/{repo}[/revision/{rev}]
    list_repo_tree        GET  /api/models/{repo}/tree/{rev}                 (flat repos: files only, one page)
    hf_hub_download       HEAD/GET /{repo}/resolve/{rev}/{path}              (X-Repo-Commit, ETag, Content-Length)
Anything else answers 404 and is recorded in `unhandled`. Not faked: Xet transfers (a client with hf_xet installed
sends every "lfs" file through Xet's CAS protocol, so by default every file is answered "regular" and travels inline,
base64 in the commit NDJSON, where the real Hub would route .safetensors through Xet), LFS multipart uploads, pull
requests, pagination, gated repos, rate limits.

Fault injection: `drop_commit=True` closes the connection on every commit request without answering (a network
failure mid-upload); `reject_card="message"` makes /api/validate-yaml refuse every card with that message.
The server stops itself after `lifetime` seconds, and on leaving its `with` block.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
BAD_TOKEN = "Invalid credentials in Authorization header"


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, repo_id: str, private: bool):
        self.repo_id, self.private = repo_id, private
        self.commits: dict[str, dict[str, bytes]] = {}
        self.branches: dict[str, str] = {}
        self.messages: dict[str, str] = {}
        self.branches["main"] = self.commit(None, {".gitattributes": GITATTRIBUTES}, "initial commit")

    def commit(self, parent: str | None, files: dict[str, bytes], message: str) -> str:
        sha = hashlib.sha1(f"{self.repo_id}{parent}{time.time_ns()}{sorted(files)}".encode()).hexdigest()
        self.commits[sha], self.messages[sha] = files, message
        return sha

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        return rev if rev in self.commits else None


class HubStandIn:
    def __init__(self, token: str, *, lifetime: float = 180.0, drop_commit: bool = False, lfs: bool = False,
                 reject_card: str | None = None):
        self.token, self.drop_commit, self.lfs, self.reject_card = token, drop_commit, lfs, reject_card
        self.lfs_store: dict[str, bytes] = {}  # sha256 -> content, filled by PUT /lfs-upload
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.commit_attempts = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True
        self._stopped = False

    def start(self) -> HubStandIn:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        with self.lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def is_lfs(self, path: str) -> bool:
        return self.lfs and fnmatch(path, "*.safetensors")

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(rev)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hub-stand-in/1"

    @property
    def hub(self) -> HubStandIn:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format, *args):  # noqa: A002 - keep the test output clean; requests are recorded instead
        pass

    # ------------------------------------------------------------------------------------ plumbing

    def _send(self, code: int, body: bytes | dict | list = b"", headers: dict | None = None, head: bool = False) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, code: int, message: str, error_code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if error_code:
            headers["X-Error-Code"] = error_code
        self._send(code, {"error": message}, headers)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers, up to the blank line
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _auth(self) -> bool | None:
        """True: the right token; False: a wrong one; None: none sent."""
        value = self.headers.get("Authorization")
        if not value:
            return None
        return value == f"Bearer {self.hub.token}"

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        with self.hub.lock:
            self.hub.requests.append((method, url.path))
        body = self._body() if method in ("POST", "PUT") else b""
        auth = self._auth()
        if auth is False:
            return self._error(401, BAD_TOKEN)
        try:
            handled = self._dispatch(method, parts, parse_qs(url.query), body, auth)
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            return self._error(400, f"bad request: {e}")
        if handled is False:
            with self.hub.lock:
                self.hub.unhandled.append((method, url.path))
            self._error(404, f"stand-in does not implement {method} {url.path}")

    do_GET = lambda self: self._route("GET")  # noqa: E731
    do_HEAD = lambda self: self._route("HEAD")  # noqa: E731
    do_POST = lambda self: self._route("POST")  # noqa: E731
    do_PUT = lambda self: self._route("PUT")  # noqa: E731

    # ------------------------------------------------------------------------------------ endpoints

    def _dispatch(self, method: str, parts: list[str], query: dict, body: bytes, auth: bool | None):
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body), auth)
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return self._validate_yaml(json.loads(body))
        if self.hub.lfs and (method, parts[:1]) in (("PUT", ["lfs-upload"]), ("POST", ["lfs-verify"])):
            return self._lfs_transfer(parts, query, body, auth)
        if method == "POST" and len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            repo = self._repo(f"{parts[0]}/{parts[1][:-4]}", auth)
            return None if repo is None else self._lfs_batch(json.loads(body), auth)
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            repo = self._repo(repo_id, auth)
            if repo is None:
                return None
            if method == "GET" and (not rest or rest[0] == "revision"):
                return self._info(repo, rest[1] if len(rest) > 1 else "main")
            if method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
                return self._tree(repo, rest[1])
            if method == "POST" and rest[:1] in (["preupload"], ["commit"], ["branch"]) and len(rest) >= 2:
                if not auth:
                    return self._error(401, BAD_TOKEN)
                rev = "/".join(rest[1:])
                return {"preupload": self._preupload, "commit": self._commit, "branch": self._branch}[rest[0]](repo, rev, body)
            return False
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            repo = self._repo(f"{parts[0]}/{parts[1]}", auth)
            return None if repo is None else self._resolve(repo, parts[3], "/".join(parts[4:]), head=method == "HEAD")
        return False

    def _repo(self, repo_id: str, auth: bool | None) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not auth):
            self._error(404 if repo is None else 401, "Repository not found", "RepoNotFound")
            return None
        return repo

    def _create_repo(self, payload: dict, auth: bool | None):
        if not auth:
            return self._error(401, BAD_TOKEN)
        repo_id = f"{payload['organization']}/{payload['name']}"
        with self.hub.lock:
            if repo_id in self.hub.repos:  # the real Hub names the repo in the body; create_repo(exist_ok=True) reads it
                msg = "You already created this model repo"
                return self._send(409, {"error": msg, "url": f"{self.hub.url}/{repo_id}"}, {"X-Error-Message": msg})
            self.hub.repos[repo_id] = Repo(repo_id, payload.get("visibility") == "private" or bool(payload.get("private")))
        self._send(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _branch(self, repo: Repo, branch: str, body: bytes):
        with self.hub.lock:
            if branch in repo.branches:
                return self._error(409, "Reference already exists")
            start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
            repo.branches[branch] = repo.resolve(start)
        self._send(200, {})

    def _preupload(self, repo: Repo, rev: str, body: bytes):
        sha = repo.resolve(rev)
        if sha is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        current = repo.commits[sha]
        files = []
        for f in json.loads(body)["files"]:
            lfs, data = self.hub.is_lfs(f["path"]), current.get(f["path"])
            oid = None if data is None else hashlib.sha256(data).hexdigest() if lfs else git_oid(data)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": files, "commitOid": sha})

    def _commit(self, repo: Repo, rev: str, body: bytes):
        with self.hub.lock:
            self.hub.commit_attempts += 1
        if self.hub.drop_commit:  # network failure mid-upload: the request arrived, no answer ever comes
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return self._error(400, "commit payload must start with a header")
        with self.hub.lock:
            parent = repo.resolve(rev)
            if parent is None:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            files = dict(repo.commits[parent])
            for item in lines[1:]:
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "deletedFile":
                    files.pop(value["path"], None)
                elif item["key"] == "lfsFile" and value["oid"] in self.hub.lfs_store:
                    files[value["path"]] = self.hub.lfs_store[value["oid"]]
                else:
                    return self._error(422, f"stand-in does not accept {item['key']} (no LFS/Xet storage)")
            sha = repo.commit(parent, files, lines[0]["value"]["summary"])
            repo.branches[rev] = sha
        self._send(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{sha}"})

    def _info(self, repo: Repo, rev: str):
        sha = repo.resolve(rev)
        if sha is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        self._send(200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": repo.private, "tags": [],
                         "siblings": [{"rfilename": p} for p in sorted(repo.commits[sha])],
                         "lastModified": "2026-01-01T00:00:00.000Z"})

    def _tree(self, repo: Repo, rev: str):
        sha = repo.resolve(rev)
        if sha is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        files = repo.commits[sha]
        entries = []
        for p, d in sorted(files.items()):
            entry = {"type": "file", "path": p, "size": len(d), "oid": git_oid(d)}
            if self.hub.is_lfs(p):
                entry["lfs"] = {"oid": hashlib.sha256(d).hexdigest(), "size": len(d), "pointerSize": 134}
            entries.append(entry)
        self._send(200, entries)

    def _resolve(self, repo: Repo, rev: str, path: str, head: bool):
        sha = repo.resolve(rev)
        if sha is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        data = repo.commits[sha].get(path)
        if data is None:
            return self._error(404, "Entry not found", "EntryNotFound")
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_oid(data)}"', "Content-Type": "application/octet-stream"}
        if self.hub.is_lfs(path):  # the Hub names LFS files by their sha256
            headers.update({"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))})
        self._send(200, data, headers, head=head)

    def _lfs_batch(self, payload: dict, auth: bool | None):
        if not auth:
            return self._error(401, BAD_TOKEN)
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.hub.lfs_store:
                # like the Hub's presigned storage URLs: no Authorization header comes with the PUT, the URL is the credential
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}?sig={self._sign(obj['oid'])}"},
                                    "verify": {"href": f"{self.hub.url}/lfs-verify"}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def _sign(self, oid: str) -> str:
        return hashlib.sha256(f"{self.hub.token}:{oid}".encode()).hexdigest()[:16]

    def _lfs_transfer(self, parts: list[str], query: dict, body: bytes, auth: bool | None):
        if parts[0] == "lfs-upload":
            if query.get("sig") != [self._sign(parts[1])]:
                return self._error(403, "bad signature")
            if hashlib.sha256(body).hexdigest() != parts[1]:
                return self._error(400, "content does not match its sha256")
            with self.hub.lock:
                self.hub.lfs_store[parts[1]] = body
            return self._send(200, b"")
        if not auth:
            return self._error(401, BAD_TOKEN)
        oid = json.loads(body)["oid"]
        self._send(200 if oid in self.hub.lfs_store else 404, {"success": oid in self.hub.lfs_store})

    def _validate_yaml(self, payload: dict):
        content = payload.get("content", "")
        block = content.split("---")[1] if content.startswith("---") else ""
        meta = yaml.safe_load(block) if block else {}
        if not isinstance(meta, dict) or self.hub.reject_card:
            message = self.hub.reject_card or "metadata must be a mapping"
            return self._send(400, {"errors": [{"message": message}], "warnings": []})
        self._send(200, {"errors": [], "warnings": []})
