"""The subscriber web app: subscribe with double opt-in, confirm, manage interests, leave.

Why Starlette on uvicorn: the app is a dozen small form pages and two POST endpoints for mail
clients. Starlette gives routing, forms, background tasks and a test client on top of ASGI and
nothing else; there is no ORM or validation layer to work around (we have SQLAlchemy and
`subscribers.ProfileSpec` already), it is async so slow SMTP or many idle clients do not tie up
workers, and uvicorn is the standard production server for it. Pages are server-rendered
Jinja2 and work without JavaScript; a few lines of script only add niceties.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from newsletter.web.app import create_app, serve

__all__ = ["create_app", "serve"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `newsletter --help` (which lists the `web` command) does not import
    # Starlette, uvicorn and the templates.
    if name in __all__:
        from newsletter.web import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
