"""The web app's HTTP side: a JSON API and one static page, on the standard library's server.

No web framework: the API is two dozen small routes, and `http.server` starts in a blink, needs no
extra install and is easy to drive from tests. Safety rules: loopback by default; when bound to
loopback, requests must name a loopback host (blocks DNS-rebinding pages); every state-changing
request needs the `X-Dreambooth` header, which a foreign web page cannot send without a CORS
preflight we never grant; files are only served by id and checked name, never by a path from the
request.
"""
from __future__ import annotations

import ipaddress
import json
import mimetypes
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from . import api
from .uploads import MAX_BYTES

STATIC = Path(__file__).resolve().parent / "static"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
ID = r"([0-9a-f]{12})"
NAME = r"([A-Za-z0-9][A-Za-z0-9._-]{0,200})"
CSRF_HEADER = "X-Dreambooth"
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "[::1]", "::1"}


class HttpError(Exception):
    def __init__(self, status: int, message: str, problems: list | None = None):
        super().__init__(message)
        self.status, self.message, self.problems = status, message, problems or []


# (method, path pattern, handler name on Handler); the groups are passed as arguments.
ROUTES = [
    ("GET", r"/", "page"),
    ("GET", r"/static/" + NAME, "static"),
    ("GET", r"/api/info", "info"),
    ("GET", r"/api/presets", "presets"),
    ("POST", r"/api/photosets", "new_set"),
    ("GET", rf"/api/photosets/{ID}", "get_set"),
    ("POST", rf"/api/photosets/{ID}/photos", "upload"),
    ("DELETE", rf"/api/photosets/{ID}/photos/{ID}", "delete_photo"),
    ("POST", rf"/api/photosets/{ID}/clear-rejected", "clear_rejected"),
    ("GET", rf"/api/photosets/{ID}/thumbs/{ID}", "thumb"),
    ("POST", r"/api/identifier/check", "check_identifier"),
    ("GET", r"/api/identifier/suggest", "suggest"),
    ("POST", r"/api/model/check", "check_model"),
    ("GET", r"/api/jobs", "list_jobs"),
    ("POST", r"/api/jobs", "submit"),
    ("GET", rf"/api/jobs/{ID}", "get_job"),
    ("POST", rf"/api/jobs/{ID}/cancel", "cancel"),
    ("POST", rf"/api/jobs/{ID}/resume", "resume"),
    ("POST", rf"/api/jobs/{ID}/generate", "generate"),
    ("GET", rf"/api/jobs/{ID}/examples", "examples"),
    ("GET", rf"/api/jobs/{ID}/downloads", "downloads"),
    ("GET", rf"/api/jobs/{ID}/(samples|generated|final)/{NAME}", "job_file"),
    ("GET", rf"/api/jobs/{ID}/(final|generated)\.zip", "job_zip"),
    ("GET", rf"/api/jobs/{ID}/export/([a-z-]+)", "export"),
]
COMPILED = [(m, re.compile(p + "$"), h) for m, p, h in ROUTES]


class Handler(BaseHTTPRequestHandler):
    """One request; routes to `api.App` methods and turns results into JSON or files."""

    app: api.App  # set on the subclass made by `make_server`
    loopback_only: bool = True
    server_version = "dreambooth-ui"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        if self.app.verbose:
            super().log_message(format, *args)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        try:
            self._check_request(method)
            for route_method, pattern, name in COMPILED:
                match = pattern.match(url.path)
                if match and route_method == method:
                    self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                    getattr(self, "route_" + name)(*match.groups())
                    return
            raise HttpError(404, f"no such page: {url.path}")
        except HttpError as err:
            self._json({"error": err.message, "problems": err.problems}, err.status)
        except (KeyError, FileNotFoundError):
            self._json({"error": "not found"}, 404)
        except (ValueError, TypeError) as err:
            self._json({"error": str(err)}, 400)
        except api.ProblemsError as err:
            self._json({"error": err.message, "problems": err.problems}, 400)

    def _check_request(self, method: str) -> None:
        if self.loopback_only and host_name(self.headers.get("Host") or "") not in LOOPBACK_HOSTS:
            raise HttpError(421, "this server answers only to localhost")
        if method != "GET" and self.headers.get(CSRF_HEADER) != "1":
            raise HttpError(403, f"missing {CSRF_HEADER} header (cross-site requests are refused)")

    # --- responses -------------------------------------------------------------------------------
    def _headers(self, status: int, content_type: str, length: int, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' blob: data:")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()

    def _json(self, data, status: int = 200) -> None:
        body = json.dumps(data).encode()
        self._headers(status, "application/json", len(body))
        self.wfile.write(body)

    def _file(self, path: Path, download: bool = False) -> None:
        if not path.is_file():
            raise FileNotFoundError(path)
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        extra = {"Content-Disposition": f'attachment; filename="{path.name}"'} if download else None
        self._headers(200, kind, path.stat().st_size, extra)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                self.wfile.write(chunk)

    def _body_json(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 1 << 20:
            raise HttpError(413, "request too large")
        data = json.loads(self.rfile.read(length) or b"{}")
        if not isinstance(data, dict):
            raise HttpError(400, "expected a JSON object")
        return data

    # --- routes ----------------------------------------------------------------------------------
    def route_page(self) -> None:
        self._file(STATIC / "index.html")

    def route_static(self, name: str) -> None:
        self._file(STATIC / name)

    def route_info(self) -> None:
        self._json(self.app.info())

    def route_presets(self) -> None:
        self._json(self.app.presets(self.query.get("purpose", "fast-lora"), self.query.get("model", "tiny-random")))

    def route_new_set(self) -> None:
        self._json(self.app.new_set(), 201)

    def route_get_set(self, set_id: str) -> None:
        self._json(self.app.get_set(set_id, int(self.query.get("resolution", 512))))

    def route_upload(self, set_id: str) -> None:
        name = unquote(self.headers.get("X-File-Name", ""))
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BYTES:
            self._discard(length)
            raise HttpError(413, self.app.reject_too_big(set_id, name, length))
        self._json(self.app.upload(set_id, name, self.rfile.read(length)), 201)

    def _discard(self, length: int) -> None:
        """Read and drop an oversized body (up to a cap) so the browser sees our answer, not a reset."""
        if length > 8 * MAX_BYTES:
            self.close_connection = True
            return
        while length > 0:
            length -= len(self.rfile.read(min(length, 1 << 20)) or b"x" * length)

    def route_delete_photo(self, set_id: str, photo_id: str) -> None:
        self._json(self.app.delete_photo(set_id, photo_id))

    def route_clear_rejected(self, set_id: str) -> None:
        self._json(self.app.clear_rejected(set_id))

    def route_thumb(self, set_id: str, photo_id: str) -> None:
        self._file(self.app.photos.thumb(set_id, photo_id))

    def route_check_identifier(self) -> None:
        body = self._body_json()
        self._json(self.app.check_identifier(str(body.get("identifier", "")), str(body.get("class_noun", ""))))

    def route_suggest(self) -> None:
        self._json(self.app.suggest(int(self.query.get("seed", 0))))

    def route_check_model(self) -> None:
        self._json(self.app.check_model(str(self._body_json().get("model", ""))))

    def route_list_jobs(self) -> None:
        self._json(self.app.list_jobs())

    def route_submit(self) -> None:
        self._json(self.app.submit(self._body_json()), 201)

    def route_get_job(self, job_id: str) -> None:
        self._json(self.app.job_json(job_id))

    def route_cancel(self, job_id: str) -> None:
        self._json(self.app.cancel(job_id))

    def route_resume(self, job_id: str) -> None:
        self._json(self.app.resume(job_id))

    def route_generate(self, job_id: str) -> None:
        self._json(self.app.generate(job_id, self._body_json()))

    def route_examples(self, job_id: str) -> None:
        self._json(self.app.examples(job_id))

    def route_downloads(self, job_id: str) -> None:
        self._json(self.app.downloads(job_id))

    def route_job_file(self, job_id: str, kind: str, name: str) -> None:
        self._file(self.app.job_file(job_id, kind, name), download=kind == "final" or "download" in self.query)

    def route_job_zip(self, job_id: str, kind: str) -> None:
        self._file(self.app.job_zip(job_id, kind), download=True)

    def route_export(self, job_id: str, fmt: str) -> None:
        self._file(self.app.export(job_id, fmt), download=True)


def host_name(header: str) -> str:
    """The host part of a Host header: "[::1]:7860" -> "[::1]", "localhost:7860" -> "localhost"."""
    if header.startswith("["):
        return header.split("]")[0] + "]"
    return header.rsplit(":", 1)[0]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def make_server(app: api.App, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """A threading server bound to `host:port` (port 0 picks a free one) serving `app`."""
    handler = type("BoundHandler", (Handler,), {"app": app, "loopback_only": is_loopback(host)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve(host: str = "127.0.0.1", port: int = 7860, workspace: str | Path | None = None) -> int:
    """Run the app until Ctrl-C; a running training is stopped with a checkpoint on the way out."""
    app = api.App(Path(workspace) if workspace else api.default_workspace()).start()
    server = make_server(app, host, port)
    if not is_loopback(host):
        print(f"warning: listening on {host}, so other machines can reach this app; it has no login. "
              "Use --host 127.0.0.1 unless you trust the network.", file=sys.stderr)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(f"dreambooth ui: http://{shown}:{server.server_address[1]}/  (workspace {app.workspace}; Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping: a running training saves a checkpoint first ...", file=sys.stderr)
    finally:
        server.server_close()
        app.shutdown()
    return 0

