"""A local stand-in for the Hugging Face Hub, enough for `snapshot_download`.

It serves the four endpoints snapshot_download uses (repo revision info, recursive tree listing,
HEAD and GET of a file under /resolve/) for in-memory repos, and records every request so tests can
count what was fetched. Point huggingface_hub at it with HF_ENDPOINT (and HF_HUB_DISABLE_XET=1).
The server shuts itself down after `lifetime_s` even if a test forgets to stop it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

COMMIT_SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]], lifetime_s: float = 120.0) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._deadline = threading.Timer(lifetime_s, self.stop)
        self._deadline.daemon = True
        self._stopped = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FakeHub":
        self._thread.start()
        self._deadline.start()
        return self

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._deadline.cancel()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def file_gets(self) -> list[str]:
        """Repo-relative paths of every file body served (GET .../resolve/<rev>/<path>)."""
        with self._lock:
            requests = list(self.requests)
        return [_resolve_path(path)[1] for method, path in requests if method == "GET" and "/resolve/" in path]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()


def _resolve_path(url_path: str) -> tuple[str, str]:
    """'/org/name/resolve/<rev>/a/b' -> ('org/name', 'a/b')."""
    parts = url_path.strip("/").split("/")
    return "/".join(parts[:2]), "/".join(parts[4:])


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self._serve(send_body=True)

        def do_HEAD(self) -> None:
            self._serve(send_body=False)

        def _reply(self, status: int, body: bytes, headers: dict[str, str], send_body: bool) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def _serve(self, send_body: bool) -> None:
            path = unquote(urlparse(self.path).path)
            hub.record(self.command, path)
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
                self._api(repo_id="/".join(parts[2:4]), endpoint=parts[4], send_body=send_body)
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._file(*_resolve_path(path), send_body=send_body)
            else:
                self._reply(404, b"", {}, send_body)

        def _api(self, repo_id: str, endpoint: str, send_body: bool) -> None:
            files = hub.repos.get(repo_id)
            if files is None:
                self._reply(404, b"{}", {"X-Error-Code": "RepoNotFound"}, send_body)
                return
            if endpoint == "revision":
                siblings = [{"rfilename": name, "size": len(data)} for name, data in files.items()]
                payload: object = {"id": repo_id, "sha": COMMIT_SHA, "siblings": siblings}
            else:
                payload = [
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in files.items()
                ]
            self._reply(200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, send_body)

        def _file(self, repo_id: str, file_path: str, send_body: bool) -> None:
            data = hub.repos.get(repo_id, {}).get(file_path)
            if data is None:
                self._reply(404, b"", {"X-Error-Code": "EntryNotFound"}, send_body)
                return
            headers = {"X-Repo-Commit": COMMIT_SHA, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            self._reply(200, data, headers, send_body)

    return Handler
