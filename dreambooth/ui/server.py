"""The web app's HTTP side: a JSON API, server-sent job progress and one static page (Starlette, uvicorn).

Every decision lives in `api.App`; this module only routes, parses and streams. Blocking work
(image checks, training commands, generation) runs in Starlette's thread pool so the event loop keeps
answering. The safety rules (Host check, access token, CSRF header, body limits, headers) are the
`guard.Guard` middleware in front of everything; files are only served by id and checked name.

Only the project's own errors become answers the page shows: `NotFound` a 404, any other
`DreamboothError` a 400 with its problems. Anything else is a bug: logged with its traceback and
answered as a 500, never disguised as the user's mistake.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import sys
import threading
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from dreambooth.errors import BadRequest, DreamboothError, NotFound
from dreambooth.ui import api, settings
from dreambooth.ui.guard import Guard, Policy, is_loopback, make_policy
from dreambooth.ui.jobs import ACTIVE
from dreambooth.ui.uploads import MAX_BYTES

STATIC = Path(__file__).resolve().parent / "static"
KEEP_ALIVE_SECONDS = 15.0
logger = logging.getLogger(__name__)


def parse_json(raw: bytes) -> dict:
    """A JSON object from a request body; bad numbers (1e400, NaN) and deep nesting answer 400."""
    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"the number {text[:20]} is out of range")
        return value

    def constant(name: str):
        raise ValueError(f"{name} is not a number this app accepts")

    try:
        data = json.loads(raw or b"{}", parse_float=finite, parse_constant=constant)
    except RecursionError:
        raise BadRequest("the request's JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"the request is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise BadRequest("expected a JSON object")
    return data


def build_app(app: api.App, policy: Policy | None = None, on_shutdown=None) -> Guard:
    """The ASGI app serving `app` under `policy` (loopback rules by default)."""

    def call(fn, status: int = 200, body: bool = False):
        """A route running `fn(*path_params[, json_body])` in the thread pool; its result is the JSON answer."""
        async def endpoint(request: Request):
            args = list(request.path_params.values())
            if body:
                args.append(parse_json(await request.body()))
            return JSONResponse(await run_in_threadpool(fn, *args), status)
        return endpoint

    q = lambda request, key, default: request.query_params.get(key, default)  # noqa: E731

    async def page(request: Request):
        return FileResponse(STATIC / "index.html")

    async def static(request: Request):
        name = request.path_params["name"]
        if not api.SAFE_FILE.match(name) or not (STATIC / name).is_file():
            raise NotFound("not found")
        return FileResponse(STATIC / name)

    async def favicon(request: Request):
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    async def presets(request: Request):
        return JSONResponse(await run_in_threadpool(app.presets, q(request, "purpose", "fast-lora"),
                                                    q(request, "model", "tiny-random")))

    async def get_set(request: Request):
        resolution = _int_query(request, "resolution", 512)
        return JSONResponse(await run_in_threadpool(app.get_set, request.path_params["set_id"], resolution))

    async def upload(request: Request):
        set_id = request.path_params["set_id"]
        async with request.form(max_files=1, max_fields=1) as form:
            photo = form.get("photo")
            if photo is None or isinstance(photo, str):
                raise BadRequest("send the photo as the multipart field 'photo'")
            data = await photo.read(MAX_BYTES + 1)
        return JSONResponse(await run_in_threadpool(app.upload, set_id, photo.filename or "", data), 201)

    async def suggest(request: Request):
        return JSONResponse(await run_in_threadpool(app.suggest, _int_query(request, "seed", 0)))

    async def job_events(request: Request):
        job_id = request.path_params["job_id"]
        app.runner.get(job_id)  # 404 before the stream starts
        return StreamingResponse(_job_stream(app, job_id), media_type="text/event-stream",
                                 headers={"X-Accel-Buffering": "no"})

    async def job_file(request: Request):
        p = request.path_params
        path = app.job_file(p["job_id"], p["kind"], p["name"])
        download = p["kind"] == "final" or "download" in request.query_params
        return FileResponse(path, filename=path.name if download else None)

    async def job_zip(request: Request):
        path = await run_in_threadpool(app.job_zip, request.path_params["job_id"], request.path_params["kind"])
        return FileResponse(path, filename=path.name)

    async def export(request: Request):
        path = await run_in_threadpool(app.export, request.path_params["job_id"], request.path_params["fmt"])
        return FileResponse(path, filename=path.name)

    async def thumb(request: Request):
        return FileResponse(app.photos.thumb(request.path_params["set_id"], request.path_params["photo_id"]))

    routes = [
        Route("/", page), Route("/static/{name}", static), Route("/favicon.ico", favicon),
        Route("/api/info", call(lambda: app.info())),
        Route("/api/presets", presets),
        Route("/api/photosets", call(lambda: app.new_set(), 201), methods=["POST"]),
        Route("/api/photosets/{set_id}", get_set),
        Route("/api/photosets/{set_id}/photos", upload, methods=["POST"]),
        Route("/api/photosets/{set_id}/photos/{photo_id}", call(app.delete_photo), methods=["DELETE"]),
        Route("/api/photosets/{set_id}/clear-rejected", call(app.clear_rejected), methods=["POST"]),
        Route("/api/photosets/{set_id}/thumbs/{photo_id}", thumb),
        Route("/api/identifier/check", call(lambda body: app.check_identifier(
            str(body.get("identifier", "")), str(body.get("class_noun", ""))), body=True), methods=["POST"]),
        Route("/api/identifier/suggest", suggest),
        Route("/api/model/check", call(lambda body: app.check_model(str(body.get("model", ""))), body=True),
              methods=["POST"]),
        Route("/api/jobs", call(lambda: app.list_jobs())),
        Route("/api/jobs", call(app.submit, 201, body=True), methods=["POST"]),
        Route("/api/jobs/{job_id}", call(app.job_json)),
        Route("/api/jobs/{job_id}/events", job_events),
        Route("/api/jobs/{job_id}/cancel", call(app.cancel), methods=["POST"]),
        Route("/api/jobs/{job_id}/resume", call(app.resume), methods=["POST"]),
        Route("/api/jobs/{job_id}/generate", call(app.generate, body=True), methods=["POST"]),
        Route("/api/jobs/{job_id}/examples", call(app.examples)),
        Route("/api/jobs/{job_id}/downloads", call(app.downloads)),
        Route("/api/jobs/{job_id}/{kind}.zip", job_zip),
        Route("/api/jobs/{job_id}/export/{fmt}", export),
        Route("/api/jobs/{job_id}/{kind}/{name}", job_file),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        if on_shutdown is not None:  # uvicorn stopped on a signal: let the running job save a checkpoint
            await run_in_threadpool(on_shutdown)

    starlette = Starlette(routes=routes, exception_handlers={DreamboothError: _project_error}, lifespan=lifespan,
                          middleware=[Middleware(ServerErrors)])
    return Guard(starlette, policy or make_policy("127.0.0.1"))


def _int_query(request: Request, key: str, default: int) -> int:
    try:
        return int(request.query_params.get(key, default))
    except ValueError:
        raise BadRequest(f"{key} must be a whole number") from None


async def _project_error(request, err: DreamboothError):
    """The project's own errors, which the user can act on: the summary and every problem."""
    status = 404 if isinstance(err, NotFound) else 400
    return JSONResponse({"error": err.summary, "problems": settings.problems_json(err.problems)}, status)


class ServerErrors:
    """ASGI middleware: an exception no handler answered is a bug, so it is logged with its traceback
    and answered as a JSON 500 (the page shows the error; the server keeps serving)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            logger.exception("unexpected error answering %s %s", scope["method"], scope["path"])
            if started:  # half an answer went out: only closing the connection is left
                raise
            await JSONResponse({"error": "internal error: the server log has the details", "problems": []},
                               500)(scope, receive, send)


async def _job_stream(app: api.App, job_id: str):
    """Server-sent events: the job's view whenever it changes; ends once the job is no longer active."""
    seen, quiet = None, 0.0
    while not app.runner.closing:
        version = app.runner.version(job_id)
        if version != seen:
            seen, quiet = version, 0.0
            view = await run_in_threadpool(app.job_json, job_id)
            yield f"event: job\ndata: {json.dumps(view)}\n\n"
            if view["status"] not in ACTIVE:
                yield "event: end\ndata: {}\n\n"
                return
        elif quiet >= KEEP_ALIVE_SECONDS:
            quiet = 0.0
            yield ": still here\n\n"  # a comment line keeps proxies and the browser from timing out
        await asyncio.sleep(0.2)
        quiet += 0.2


def listening_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A bound, listening socket (port 0 picks a free one); a deep backlog, so bursts of clients queue."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


class BackgroundServer:
    """The app served by uvicorn on a thread (tests, notebooks): `with BackgroundServer(app) as url: ...`."""

    def __init__(self, app: api.App, host: str = "127.0.0.1", port: int = 0, policy: Policy | None = None):
        import uvicorn

        self.sock = listening_socket(host, port)
        asgi = build_app(app, policy or make_policy(host))
        config = uvicorn.Config(asgi, log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            threading.Event().wait(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def serve(host: str = "127.0.0.1", port: int = 7860, workspace: str | Path | None = None,
          allow_hosts: tuple[str, ...] = (), app: api.App | None = None) -> int:
    """Run the app until Ctrl-C or SIGTERM; a running training saves a checkpoint before the exit."""
    import uvicorn

    app = app or api.App(Path(workspace) if workspace else api.default_workspace()).start()
    policy = make_policy(host, tuple(allow_hosts))
    sock = listening_socket(host, port)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown if ':' not in shown else f'[{shown}]'}:{sock.getsockname()[1]}/"
    if policy.token:
        url += f"?token={policy.token}"
        print(f"warning: listening on {host}, so other machines can reach this app. Open it with the link "
              "below (it holds the access token; keep it private).", file=sys.stderr)
    print(f"dreambooth ui: {url}  (workspace {app.workspace}; Ctrl-C stops)", flush=True)

    def stop_jobs() -> None:
        print("stopping: a running training saves a checkpoint first ...", file=sys.stderr, flush=True)
        app.shutdown()

    asgi = build_app(app, policy, on_shutdown=stop_jobs)
    config = uvicorn.Config(asgi, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


__all__ = ["BackgroundServer", "build_app", "is_loopback", "serve"]
