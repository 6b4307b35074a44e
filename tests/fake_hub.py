"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, for push tests without network.

It implements just what `huggingface_hub` calls to publish: create a repo, create a branch, validate a
model card's metadata, ask how each file should be uploaded ("preupload": always inline, so no LFS/Xet
storage is needed) and commit (an NDJSON body with base64 file contents). Every request is recorded,
with its headers, for the tests to check.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict[str, Any]] = field(default_factory=list)


class FakeHub:
    """`with FakeHub() as hub:` serves at `hub.endpoint`; `hub.repos` and `hub.requests` hold what arrived."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[dict[str, Any]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body})
                status, reply = hub.handle(self.path.split("?")[0], body)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_DELETE = do_POST  # recorded, and answered 404 by `handle`

            def log_message(self, *args):  # keep test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, path: str, body: bytes) -> tuple[int, Any]:
        if path == "/api/repos/create":
            request = json.loads(body)
            repo_id = "/".join(filter(None, (request.get("organization"), request["name"])))
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo"}
            self.repos[repo_id] = Repo(private=request.get("visibility") == "private")
            return 200, {"url": f"{self.endpoint}/{repo_id}"}
        if path == "/api/validate-yaml":  # the client checks a README.md's metadata header before committing it
            header = json.loads(body)["content"].split("---")
            metadata = yaml.safe_load(header[1]) if len(header) > 2 and not header[0].strip() else None
            if not isinstance(metadata, dict):
                return 400, {"errors": [{"message": "README.md has no YAML metadata header"}]}
            return 200, {"errors": [], "warnings": []}
        if match := re.fullmatch(rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", path):
            repo = self.repos[match["repo"]]
            if match["branch"] in repo.branches:
                return 409, {"error": "Reference already exists"}
            repo.branches[match["branch"]] = dict(repo.branches["main"])
            return 200, {}
        if match := re.fullmatch(rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", path):
            if match["repo"] not in self.repos:
                return 404, {"error": "Repository not found"}
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        if match := re.fullmatch(rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", path):
            repo = self.repos.get(match["repo"])
            if repo is None or match["rev"] not in repo.branches:
                return 404, {"error": "Repository or revision not found"}
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            files = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                     for item in lines if item["key"] == "file"}
            repo.branches[match["rev"]].update(files)
            oid = hashlib.sha1(body).hexdigest()
            repo.commits.append({"revision": match["rev"], "header": lines[0]["value"], "files": sorted(files), "oid": oid})
            return 200, {"commitOid": oid, "commitUrl": f"{self.endpoint}/{match['repo']}/commit/{oid}",
                         "pullRequestUrl": None}
        return 404, {"error": f"not implemented by the fake Hub: {path}"}
