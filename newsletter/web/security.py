"""Response headers every page carries, and CSRF protection for our own forms.

Headers: pages hold signed tokens in their URLs, so nothing may leak them (no Referer, no
caching, no framing), and the CSP allows only what we serve ourselves, with a per-request nonce
for the one inline <style> and <script>.

CSRF: a signed double-submit token. A random value lives in an HttpOnly cookie; each form
carries that value signed with the app's secret (itsdangerous, its own salt, timed). A POST is
accepted only when the form's token verifies and names the cookie's value, and when a browser
sent an Origin header, it is ours. Another site can make a browser POST to us but can neither
read our cookie nor mint a signature for it. No server-side session store is needed.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Mapping
from urllib.parse import urlsplit

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSRF_COOKIE = "nl_csrf"
CSRF_FIELD = "csrf_token"
CSRF_MAX_AGE = 24 * 3600  # a form left open overnight still works; older ones ask to reload
_COOKIE_VALUE = re.compile(r"^[A-Za-z0-9_-]{32,64}$")


def content_security_policy(nonce: str, *, frame_src: str = "'none'") -> str:
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src 'nonce-{nonce}'",
            f"style-src 'nonce-{nonce}'",
            "img-src 'self'",
            "connect-src 'self'",
            f"frame-src {frame_src}",
            "form-action 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
        ]
    )


def default_headers(nonce: str, *, https: bool) -> dict[str, str]:
    headers = {
        "Content-Security-Policy": content_security_policy(nonce),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cross-Origin-Resource-Policy": "same-origin",
        "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
        # Every page is personal or carries a token in its URL: no cache may keep one.
        "Cache-Control": "no-store",
    }
    if https:
        headers["Strict-Transport-Security"] = "max-age=31536000"
    return headers


def apply_default_headers(headers: MutableHeaders, nonce: str, *, https: bool) -> None:
    """Sets each header the response did not set itself (a route may widen its own CSP)."""
    for name, value in default_headers(nonce, https=https).items():
        if name not in headers:
            headers[name] = value


def csp_nonce(request: Request) -> str:
    nonce = getattr(request.state, "csp_nonce", None)
    if not isinstance(nonce, str):  # a request that did not pass the middleware (tests)
        nonce = secrets.token_urlsafe(16)
        request.state.csp_nonce = nonce
    return nonce


class SecurityMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware), so streaming and background tasks are untouched.

    Makes the request's CSP nonce, adds the default headers, and sets the CSRF cookie when a
    page handed out a token for a cookie the browser did not have yet."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        nonce = secrets.token_urlsafe(16)
        state["csp_nonce"] = nonce
        https = scope.get("scheme") == "https"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                apply_default_headers(headers, nonce, https=https)
                cookie = state.get("csrf_new_cookie")
                if isinstance(cookie, str):
                    headers.append("Set-Cookie", _cookie_header(cookie, https=https))
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _cookie_header(value: str, *, https: bool) -> str:
    # Session cookie (no Max-Age): the token inside forms is timed, the cookie need not be.
    parts = [f"{CSRF_COOKIE}={value}", "Path=/", "HttpOnly", "SameSite=Lax"]
    if https:
        parts.append("Secure")
    return "; ".join(parts)


class CsrfError(Exception):
    """A POST without a valid token; the message is for the person, not for an attacker."""


class Csrf:
    def __init__(self, secret_key: str) -> None:
        self._serializer = URLSafeTimedSerializer(secret_key, salt="newsletter.web.csrf")

    @staticmethod
    def _cookie(request: Request) -> str | None:
        value = request.cookies.get(CSRF_COOKIE)
        return value if value and _COOKIE_VALUE.match(value) else None

    def token(self, request: Request) -> str:
        """The value for a form's hidden field; makes the cookie on first use."""
        value = getattr(request.state, "csrf_value", None)
        if not isinstance(value, str):
            value = self._cookie(request)
            if value is None:
                value = secrets.token_urlsafe(32)
                request.state.csrf_new_cookie = value
            request.state.csrf_value = value
        token = self._serializer.dumps(value)
        assert isinstance(token, str)
        return token

    def check(self, request: Request, form: Mapping[str, str], allowed_origins: set[str]) -> None:
        # Browsers say where a request comes from; with Referrer-Policy no-referrer a form
        # POST carries `Origin: null`, so the origin can only veto, and the token decides.
        origin = request.headers.get("origin")
        site = request.headers.get("sec-fetch-site")
        if (origin not in (None, "null") and origin not in allowed_origins) or (
            site is not None and site not in ("same-origin", "none")
        ):
            raise CsrfError("this form was sent from another site")
        cookie = self._cookie(request)
        if cookie is None:
            raise CsrfError(
                "your browser did not send back our security cookie; allow cookies for this "
                "site, reload the page and try again"
            )
        submitted = form.get(CSRF_FIELD, "")
        try:
            value = self._serializer.loads(submitted, max_age=CSRF_MAX_AGE)
        except BadSignature:
            raise CsrfError(
                "this form is too old or was not made by this site; reload the page and try again"
            ) from None
        if not isinstance(value, str) or not hmac.compare_digest(value, cookie):
            raise CsrfError("this form was made for another browser; reload the page and try again")


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def allowed_origins(request: Request, base_url: str) -> set[str]:
    """The public origin from settings, and the one the request arrived on (a developer's
    127.0.0.1:8000, or the host a proxy passed on)."""
    return {origin_of(base_url), origin_of(str(request.base_url))}
