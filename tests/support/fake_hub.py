"""A Hugging Face hub stand-in on loopback, for testing the real download code offline.

It answers the calls huggingface_hub makes for `snapshot_download` / `hf_hub_download` (repo info, the
file tree, HEAD and GET of `resolve/<commit>/<file>`) for repositories made of local files, and can send
one file slowly so a test can watch a download in progress. Plain HTTP only (no xet), no auth.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

CHUNK = 64 * 1024


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, Path]], slow_file: str = "", slow_chunk_s: float = 0.0):
        """`repos`: repo id -> {path in repo: local file}. `slow_file` is sent CHUNK bytes per `slow_chunk_s`."""
        self.repos = repos
        self.slow_file, self.slow_chunk_s = slow_file, slow_chunk_s
        self.sha = {repo: hashlib.sha1(repo.encode()).hexdigest() for repo in repos}
        self.downloads: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _json(self, handler, data, status=200, body=True) -> None:
        raw = json.dumps(data).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(raw)))
        handler.end_headers()
        if body:
            handler.wfile.write(raw)

    def _answer(self, handler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        for repo, files in self.repos.items():
            sha = self.sha[repo]
            if path.startswith(f"/api/models/{repo}/revision/"):
                return self._json(
                    handler, {"id": repo, "sha": sha, "siblings": [{"rfilename": f} for f in files]}, body=body
                )
            if path.startswith(f"/api/models/{repo}/tree/"):
                tree = [
                    {
                        "type": "file",
                        "path": name,
                        "size": local.stat().st_size,
                        "oid": hashlib.sha1(local.read_bytes()).hexdigest(),
                    }
                    for name, local in files.items()
                ]
                return self._json(handler, tree, body=body)
            prefix = f"/{repo}/resolve/"
            if path.startswith(prefix):
                name = path[len(prefix) :].split("/", 1)[1]
                if name in files:
                    return self._file(handler, sha, name, files[name], body)
        self._json(handler, {"error": "not found"}, status=404, body=body)

    def _file(self, handler, sha: str, name: str, local: Path, body: bool) -> None:
        data = local.read_bytes()
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("X-Repo-Commit", sha)
        handler.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        handler.send_header("Content-Type", "application/octet-stream")
        handler.end_headers()
        if not body:
            return
        self.downloads.append(name)
        slow = name == self.slow_file
        for start in range(0, len(data), CHUNK):
            handler.wfile.write(data[start : start + CHUNK])
            handler.wfile.flush()
            if slow:
                time.sleep(self.slow_chunk_s)
