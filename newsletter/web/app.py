"""The application factory, and running it under uvicorn."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from newsletter.app import App
from newsletter.web import routes_manage, routes_subscribe, routes_unsubscribe, sinkview
from newsletter.web.context import NextStep, WebContext
from newsletter.web.forms import MAX_BODY_BYTES
from newsletter.web.security import SecurityMiddleware, apply_default_headers, csp_nonce

log = logging.getLogger(__name__)

FAVICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
    '<rect width="32" height="32" rx="7" fill="#3b5bdb"/>'
    '<path d="M9 10h14M9 16h14M9 22h9" stroke="#fff" stroke-width="3" stroke-linecap="round"/>'
    "</svg>"
)

_TITLES = {
    400: "This request could not be understood",
    403: "We could not accept this form",
    404: "This page does not exist",
    405: "This page cannot be used that way",
    413: "That was too much to send",
}


def create_app(
    app: App, *, sink_dir: Path | None = None, extra_routes: Sequence[BaseRoute] = ()
) -> Starlette:
    """The web app over `app`'s database and settings. `extra_routes` come first, so that
    operational endpoints (/healthz, /metrics) are never shadowed by a page. The development
    mail viewer at /_sink exists only when `sink_dir` is given."""
    web = WebContext(app, sink_dir=sink_dir)

    async def favicon(request: Request) -> Response:
        return Response(
            FAVICON,
            media_type="image/svg+xml",
            headers={"Cache-Control": "public, max-age=86400"},
        )

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        status = exc.status_code
        title = _TITLES.get(status, "Something is not right")
        custom = exc.detail and exc.detail != HTTPStatus(status).phrase
        message = exc.detail if custom else _message(status)
        next_step = NextStep(request.url.path, "Reload the form") if status == 403 else None
        return web.render(
            request,
            "error.html",
            {"title": title, "message": message, "next_step": next_step or NextStep("/", "Home")},
            status=status,
            headers=dict(exc.headers or {}),
        )

    async def server_error(request: Request, exc: Exception) -> Response:
        # Outside our middleware (Starlette puts this handler outermost): add the headers here.
        response = web.render(
            request,
            "error.html",
            {
                "title": "Something went wrong on our side",
                "message": "Nothing you did caused this. Please try again in a few minutes.",
                "next_step": NextStep("/", "Home"),
            },
            status=500,
        )
        apply_default_headers(
            response.headers, csp_nonce(request), https=request.url.scheme == "https"
        )
        return response

    routes: list[BaseRoute] = [
        *extra_routes,
        *routes_subscribe.routes(web),
        *routes_manage.routes(web),
        *routes_unsubscribe.routes(web),
        Route("/favicon.svg", favicon, methods=["GET"]),
    ]
    if sink_dir is not None:
        routes += sinkview.routes(web, sink_dir)
    starlette = Starlette(
        routes=routes,
        middleware=[
            Middleware(SecurityMiddleware),
            # Inside the security middleware (not Starlette's max_body_size, which sits
            # outside it), so a 413 carries the same headers as every other response.
            Middleware(RequestBodyLimitMiddleware, max_body_size=MAX_BODY_BYTES),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )
    starlette.state.web = web
    return starlette


def _message(status: int) -> str:
    if status == 404:
        return "Check the address, or start from the home page."
    if status == 413:
        return "The form was larger than we accept. Shorten it and try again."
    return "Go back and try again."


def serve(app: App, host: str, port: int, *, sink_dir: Path | None = None) -> None:
    """Serve until interrupted. Behind a reverse proxy, run it on 127.0.0.1: uvicorn trusts
    X-Forwarded-For/-Proto from there (FORWARDED_ALLOW_IPS widens that), which gives rate
    limits the real client address and cookies the Secure flag."""
    config = uvicorn.Config(
        create_app(app, sink_dir=sink_dir, extra_routes=_ops_routes(app)),
        host=host,
        port=port,
        proxy_headers=True,
        server_header=False,
        log_level="info",
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()


def _ops_routes(app: App) -> list[BaseRoute]:
    """/healthz and /metrics, so `newsletter web` on its own can be probed and scraped too."""
    from newsletter.ops import ops_routes

    return list(ops_routes(app))
