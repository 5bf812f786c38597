"""The web app's safety rules, as one ASGI middleware in front of every route.

- Host check (DNS rebinding): a page on an attacker's domain that re-points its name at 127.0.0.1
  still sends its own name as Host, so only loopback names, the bound address, IP literals (when
  exposed; no DNS is involved in those) and names given with --allow-host are answered.
- Access token when exposed beyond loopback: random, printed once; the first visit with
  `?token=...` moves it into an HttpOnly, SameSite=Strict cookie and drops it from the address bar.
- CSRF: every state-changing request needs the `X-Dreambooth` header, which a foreign page cannot
  send without a CORS preflight this app never grants.
- Body limits checked from Content-Length before anything is read: missing (411), malformed or
  negative (400) and too large (413) lengths are refused.
- Headers against sniffing, caching and framing (clickjacking) on every answer.
"""
from __future__ import annotations

import ipaddress
import json
import re
import secrets
from dataclasses import dataclass
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, urlencode

CSRF_HEADER = "x-dreambooth"
TOKEN_COOKIE = "dreambooth_token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]"}
JSON_LIMIT = 1 << 20
UPLOAD_PATH = re.compile(r"^/api/photosets/[^/]+/photos$")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),  # the token never leaks through a Referer
]


@dataclass(frozen=True)
class Policy:
    """Who may talk to the app: allowed Host names, and the access token (None on loopback)."""

    hosts: frozenset[str] = frozenset(LOOPBACK_NAMES)
    allow_ip_literals: bool = False
    token: str | None = None
    upload_limit: int = 25 * 1024 * 1024 + 64 * 1024  # the photo plus multipart framing


def make_policy(host: str, allow_hosts: tuple[str, ...] = (), token: str | None = None) -> Policy:
    """Loopback: no token, loopback names only. Anything else: a token (made here unless given)."""
    names = {normalize_host(h) for h in (*LOOPBACK_NAMES, host, *allow_hosts)}
    if is_loopback(host):
        return Policy(frozenset(names), token=token)
    return Policy(frozenset(names), allow_ip_literals=True, token=token or secrets.token_urlsafe(24))


def normalize_host(name: str) -> str:
    name = name.strip().lower()
    if ":" in name and not name.startswith("["):  # a bare IPv6 address
        return f"[{name}]"
    return name


def host_name(header: str) -> str:
    """The host part of a Host header: "[::1]:7860" -> "[::1]", "localhost:7860" -> "localhost"."""
    header = header.strip().lower()
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


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


class Refused(Exception):
    def __init__(self, status: int, message: str, headers: list | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or []


def check_request(policy: Policy, method: str, path: str, headers: dict[str, str], query: str) -> None:
    """Raise `Refused` for a request that breaks a rule; the order matters (Host first)."""
    host = host_name(headers.get("host", ""))
    if host not in policy.hosts and not (policy.allow_ip_literals and _is_ip(host)):
        raise Refused(421, "this server does not answer to that host name; start it with --allow-host NAME "
                           "to add one")
    if policy.token is not None:
        check_token(policy.token, method, path, headers, query)
    if method not in ("GET", "HEAD") and headers.get(CSRF_HEADER) != "1":
        raise Refused(403, "missing X-Dreambooth header (cross-site requests are refused)")
    if method in ("POST", "PUT", "PATCH", "DELETE"):
        check_length(headers, policy.upload_limit if UPLOAD_PATH.match(path) else JSON_LIMIT, method)


def check_token(token: str, method: str, path: str, headers: dict[str, str], query: str) -> None:
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except Exception:  # noqa: BLE001 - a malformed cookie is the same as none
        pass
    sent = cookie[TOKEN_COOKIE].value if TOKEN_COOKIE in cookie else ""
    if secrets.compare_digest(sent.encode(), token.encode()):
        return
    params = parse_qsl(query, keep_blank_values=True)
    given = dict(params).get("token", "")
    if method == "GET" and secrets.compare_digest(given.encode(), token.encode()):
        rest = urlencode([(k, v) for k, v in params if k != "token"])
        cookie_header = f"{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
        raise Refused(303, "signed in", [(b"location", (path + ("?" + rest if rest else "")).encode()),
                                         (b"set-cookie", cookie_header.encode())])
    raise Refused(401, "this app needs its access token: open the link with ?token=... that `dreambooth ui` "
                       "printed when it started")


def check_length(headers: dict[str, str], limit: int, method: str) -> None:
    length = headers.get("content-length")
    if length is None:
        if "transfer-encoding" in headers or method == "POST":
            raise Refused(411, "send the request with a Content-Length")
        return
    if not length.strip().isdigit():
        raise Refused(400, f"bad Content-Length {length[:20]!r}")
    if int(length) > limit:
        raise Refused(413, f"request too large ({int(length) / 2**20:.1f} MB; the limit is {limit // 2**20} MB)")


class Guard:
    """ASGI middleware: `check_request` on every HTTP request, security headers on every answer."""

    def __init__(self, app, policy: Policy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            check_request(self.policy, scope["method"], scope["path"], headers,
                          scope.get("query_string", b"").decode("latin-1"))
        except Refused as refused:
            return await _refuse(refused, send, as_text=not scope["path"].startswith("/api/"))

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=list(message.get("headers", [])) + SECURITY_HEADERS)
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _refuse(refused: Refused, send, as_text: bool = False) -> None:
    """The refusal as JSON for the API, as plain text for a browser opening a page."""
    if as_text:
        body, kind = f"DreamBooth web app: {refused.message}\n".encode(), b"text/plain; charset=utf-8"
    else:
        body, kind = json.dumps({"error": refused.message, "problems": []}).encode(), b"application/json"
    headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), *SECURITY_HEADERS, *refused.headers]
    await send({"type": "http.response.start", "status": refused.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
