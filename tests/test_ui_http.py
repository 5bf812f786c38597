"""The web app's HTTP layer on a real uvicorn: guards, body limits, bad JSON, the access token,
headers, many clients at once, and the server-sent progress stream."""
from __future__ import annotations

import io
import json
import logging
import socket
import threading
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from dreambooth.errors import BadRequest, Problem
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


@pytest.mark.parametrize("length, status", [("-1", 400), ("abc", 400), (str(200 * 2**20), 413), (None, 411)])
def test_body_lengths_are_checked_before_reading(url, length, status):
    """A negative, malformed, huge or missing Content-Length is answered at once, body unread."""
    head = "POST /api/photosets HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Dreambooth: 1\r\nConnection: close\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    answer = raw(url, (head + "\r\n").encode() + b"{}")
    assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == str(status).encode(), answer[:200]


def test_upload_over_the_limit_is_refused_from_its_length(url):
    status, body, _ = request(url + "/api/photosets", "POST", CSRF, b"")
    set_id = json.loads(body)["id"]
    head = (f"POST /api/photosets/{set_id}/photos HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Dreambooth: 1\r\n"
            f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {26 * 2**20}\r\n\r\n")
    answer = raw(url, head.encode() + b"--x\r\n")  # the 26 MB never come: the answer must not wait for them
    assert b" 413 " in answer.split(b"\r\n", 1)[0]


@pytest.mark.parametrize("body", [b'{"seed": 1e400}', b'{"seed": NaN}', b"[" * 100_000 + b"]" * 100_000,
                                  b"not json"])
def test_bad_json_answers_400_with_a_message(url, body):
    status, answer, _ = request(url + "/api/model/check", "POST", {**CSRF, "Content-Type": "application/json"}, body)
    assert status == 400 and json.loads(answer)["error"]


@pytest.mark.parametrize("body", [b'{"prompt": "a", "seed": 1e300}', b'{"prompt": "a", "num": "four"}',
                                  b'{"prompt": "a", "steps": -3}'])
def test_generate_numbers_are_checked_and_named(app, url, body):
    job = app.runner.submit("sks dog", {}, lambda images: {"train": {"steps": 3}})
    status, answer, _ = request(f"{url}/api/jobs/{job.id}/generate", "POST", CSRF, body)
    field = json.loads(body).keys() - {"prompt"}
    assert status == 400 and json.loads(answer)["error"].startswith(field.pop())


def test_a_bug_in_a_handler_is_a_logged_500_and_a_project_error_keeps_its_4xx(app, url, monkeypatch, caplog):
    """A KeyError from a bug is no 'not found': it answers 500 and leaves its traceback in the log."""
    def bug():
        raise KeyError("a bug, not a missing job")

    monkeypatch.setattr(app, "info", bug)
    with caplog.at_level(logging.ERROR, logger="dreambooth.ui.server"):
        status, answer, _ = request(url + "/api/info")
    assert status == 500 and "internal error" in json.loads(answer)["error"]
    logged = [r for r in caplog.records if r.name == "dreambooth.ui.server"]
    assert logged and logged[0].exc_info[0] is KeyError and "/api/info" in logged[0].getMessage()

    def refused():
        raise BadRequest("that cannot be done", [Problem("Steps", "use at most 100")])

    monkeypatch.setattr(app, "info", refused)
    status, answer, _ = request(url + "/api/info")
    assert status == 400 and json.loads(answer) == {
        "error": "that cannot be done",
        "problems": [{"where": "Steps", "severity": "error", "message": "use at most 100"}]}
    monkeypatch.setattr(app, "info", lambda: app.runner.get("0123456789ab"))  # a well-formed id of no job
    status, answer, _ = request(url + "/api/info")
    assert status == 404 and json.loads(answer)["error"] == "no such job"


def test_every_answer_refuses_framing(url):
    for path in ("/", "/api/info", "/api/nothing-here"):
        _, _, headers = request(url + path)
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff"
    status, body, headers = request(url + "/favicon.ico")
    assert status == 200 and headers["Content-Type"].startswith("image/svg") and b"<svg" in body


def test_exposed_mode_needs_the_token_and_keeps_the_host_check(app):
    """Bound beyond loopback: no access without the token; ?token= moves it into a strict cookie."""
    policy = make_policy("0.0.0.0")
    assert policy.token and len(policy.token) >= 24 and policy.token != make_policy("0.0.0.0").token
    with BackgroundServer(app, policy=policy) as url:
        assert request(url + "/api/info")[0] == 401
        assert request(url + "/?token=wrong")[0] == 401
        assert request(url + "/api/info", headers={"Host": "evil.example"})[0] == 421  # DNS rebinding
        assert request(url + "/api/info", headers={"Host": "192.168.1.20:7860",
                                                    "Cookie": f"dreambooth_token={policy.token}"})[0] == 200
        status, _, headers = request(f"{url}/?token={policy.token}")
        assert status == 303 and headers["Location"] == "/"  # the token leaves the address bar
        cookie = headers["Set-Cookie"]
        assert f"dreambooth_token={policy.token}" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        with_cookie = {"Cookie": f"dreambooth_token={policy.token}"}
        assert request(url + "/api/info", headers=with_cookie)[0] == 200
        assert request(url + "/api/photosets", "POST", with_cookie, b"")[0] == 403  # CSRF still applies
    allowed = make_policy("0.0.0.0", ("studio.lan",))
    with BackgroundServer(app, policy=allowed) as url:
        headers = {"Host": "studio.lan:7860", "Cookie": f"dreambooth_token={allowed.token}"}
        assert request(url + "/api/info", headers=headers)[0] == 200
    assert make_policy("127.0.0.1").token is None  # loopback: no token, as before


def test_thirty_clients_at_once_all_get_answers(url):
    barrier = threading.Barrier(30)

    def one(_):
        with socket.create_connection(tuple([url.split("//")[1].split(":")[0], int(url.rsplit(":", 1)[1])]),
                                      timeout=30) as sock:
            barrier.wait()
            sock.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return sock.recv(64)

    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(one, range(30)))
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers)


def test_job_progress_arrives_as_server_sent_events(app, url, monkeypatch):
    """The stream sends the job's state at once and on every change, then `end` when it is done."""
    from dreambooth.training import events as ev

    monkeypatch.setattr("dreambooth.config.build_config", lambda data, problems=None: data)
    go = threading.Event()

    def trainer(config, output, **kwargs):
        yield ev.Started(0, 2, 1, "cpu", "no")
        for step in (1, 2):
            go.wait(10)
            yield ev.StepDone(step, 2, 0.5, 0.5, 0.0, 1e-4, 0.1)
        yield ev.Finished(2, output, 0.2)

    app.runner._train_fn = trainer
    job = app.runner.submit("sks dog", {}, lambda images: {"train": {"steps": 2}})
    seen = []
    with urllib.request.urlopen(f"{url}/api/jobs/{job.id}/events", timeout=30) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        event = None
        for line in stream:
            line = line.decode().strip()
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "job":
                seen.append(json.loads(line[6:]))
                go.set()
            elif line.startswith("data: ") and event == "end":
                break
    assert seen[-1]["status"] == "finished" and seen[-1]["step"] == 2
    assert len(seen) >= 2 and seen[0]["status"] in ("queued", "running")


SERVER_SCRIPT = """
import sys, time
from pathlib import Path
import dreambooth.config
from dreambooth.training import events as ev
from dreambooth.errors import BadRequest, Problem
from dreambooth.ui.api import App
from dreambooth.ui.server import serve

dreambooth.config.build_config = lambda data, problems=None: data  # the scripted job's config is a stub

def trainer(config, output, *, resume=False, overwrite=False, stop=None):
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.yaml").write_text("scripted")
    yield ev.Started(0, 10_000, 1, "cpu", "no")
    for step in range(1, 10_001):
        time.sleep(0.05)
        yield ev.StepDone(step, 10_000, 0.5, 0.5, 0.0, 1e-4, 0.05)
        if stop.is_set():
            checkpoint = output / "checkpoints" / f"step-{step:05d}"
            checkpoint.mkdir(parents=True)
            yield ev.CheckpointSaved(step, checkpoint)
            yield ev.Stopped(step, checkpoint)
            return

app = App(Path(sys.argv[1]), trainer).start()
app.runner.submit("sks dog", {}, lambda images: {"train": {"steps": 10_000}})
serve("127.0.0.1", 0, app=app)
"""


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_to_the_server_saves_the_running_jobs_checkpoint(tmp_path, signal_name):
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "server.py"
    script.write_text(SERVER_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ws")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert "dreambooth ui: http://127.0.0.1:" in proc.stdout.readline()
        job_file = next(iter((tmp_path / "ws" / "jobs").glob("*/job.json")))
        end = time.monotonic() + 60
        while json.loads(job_file.read_text())["step"] < 3:
            assert time.monotonic() < end, "the job never ran"
            time.sleep(0.1)
        proc.send_signal(getattr(signal, signal_name))
        proc.wait(30)
    finally:
        proc.kill()
    job = json.loads(job_file.read_text())
    assert job["status"] == "stopped" and job["checkpoint"].startswith("checkpoints/step-")
    assert (job_file.parent / "run" / job["checkpoint"]).is_dir()
