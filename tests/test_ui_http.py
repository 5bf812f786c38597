"""The web app's HTTP layer on a real uvicorn: guards, body limits, bad JSON, the access token,
headers, many clients at once, and the server-sent progress stream."""
from __future__ import annotations

import io
import json
import socket
import threading
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from dreambooth.ui.api import App
from dreambooth.ui.guard import make_policy
from dreambooth.ui.server import BackgroundServer

CSRF = {"X-Dreambooth": "1"}


def png_bytes(colour=(200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, "PNG")
    return buffer.getvalue()


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"photo\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.fixture
def app(tmp_path):
    app = App(tmp_path).start()
    yield app
    app.shutdown()


@pytest.fixture
def url(app):
    with BackgroundServer(app) as base:
        yield base


def request(url: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None):
    """(status, body bytes, headers); never follows redirects."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, body, headers or {}, method=method), timeout=30) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers


def upload(url: str, set_id: str, name: str, data: bytes):
    body, kind = multipart(name, data)
    return request(f"{url}/api/photosets/{set_id}/photos", "POST", {**CSRF, "Content-Type": kind}, body)


def raw(url: str, text: bytes) -> bytes:
    """Send raw bytes on a fresh connection; return everything the server answers."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(text)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_http_refuses_foreign_hosts_cross_site_posts_and_path_tricks(url):
    assert request(url + "/api/info")[0] == 200
    assert request(url + "/api/info", headers={"Host": "evil.example"})[0] == 421
    assert request(url + "/api/photosets", "POST", body=b"")[0] == 403
    status, body, _ = request(url + "/api/photosets", "POST", CSRF, b"")
    set_id = json.loads(body)["id"]
    status, body, _ = upload(url, set_id, "../../a.png", b"not an image")
    assert status == 400 and b"a.png is not an image" in body
    assert upload(url, set_id, "b.png", png_bytes())[0] == 201
    for path in ("/static/..%2F..%2Fjobs.py", "/api/jobs/000000000000/samples/..%2Fjob.json",
                 f"/api/photosets/{set_id}/thumbs/..", "/static/../api.py"):
        assert request(url + path)[0] == 404, path
    assert request(url + "/")[0] == 200
