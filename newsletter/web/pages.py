"""Page rendering: Jinja2 with autoescaping on for everything, from `templates/web/`.

An operator's `templates_dir` is searched first, as for the emails, so a site can restyle one
page without copying the rest. StrictUndefined turns a misspelt variable into an error in the
tests instead of a silently empty spot on a page.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined
from starlette.requests import Request
from starlette.responses import HTMLResponse

from newsletter.config import Settings
from newsletter.render import BUILTIN_TEMPLATES
from newsletter.web.forms import timezone_options
from newsletter.web.security import CSRF_FIELD, Csrf, csp_nonce


def _hour(value: int | str) -> str:
    try:
        return f"{int(value):02d}:00"
    except ValueError:
        return str(value)


class Pages:
    def __init__(
        self,
        settings: Settings,
        *,
        site_name: str,
        sink_enabled: bool,
        csrf: Callable[[], Csrf],
    ) -> None:
        folders = [Path(settings.templates_dir)] if settings.templates_dir else []
        folders.append(BUILTIN_TEMPLATES)
        self.env = Environment(
            loader=ChoiceLoader([FileSystemLoader(str(f)) for f in folders]),
            autoescape=True,
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["hour"] = _hour
        self.env.globals.update(
            site_name=site_name,
            sink_enabled=sink_enabled,
            csrf_field=CSRF_FIELD,
            timezone_options=timezone_options,
        )
        self._csrf = csrf  # called only when a page has a form: error pages need no secret

    def render(
        self,
        request: Request,
        name: str,
        context: Mapping[str, Any] | None = None,
        *,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> HTMLResponse:
        def csrf_token() -> str:
            return self._csrf().token(request)

        ctx = {
            "request": request,
            "nonce": csp_nonce(request),
            "csrf_token": csrf_token,
            **(context or {}),
        }
        html = self.env.get_template(f"web/{name}").render(ctx)
        return HTMLResponse(html, status_code=status, headers=dict(headers or {}))

    def fragment(self, name: str, context: Mapping[str, Any]) -> str:
        return self.env.get_template(f"web/{name}").render(context)
