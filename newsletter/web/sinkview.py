"""The development mail viewer: what the sink caught, as a reader's mail client would show it.

Mounted only when the app is started with a sink folder (`newsletter web --sink-dir`), never
otherwise. Email HTML is untrusted content: it is served from its own URL with a CSP sandbox
(no scripts, no network, no same-origin access) and shown in a sandboxed iframe. The page also
checks the List-Unsubscribe headers that Gmail and Yahoo require of bulk senders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from newsletter.sink import SinkMessage, list_messages
from newsletter.web.context import WebContext
from newsletter.web.security import content_security_policy, csp_nonce

RAW_SHOWN = 256 * 1024
_ANGLE = re.compile(r"<([^<>]*)>")
_HEAD = re.compile(r"<head\b[^>]*>", re.IGNORECASE)
_URL = re.compile(r"""https?://[^\s<>"']+""")
# The frame may show the email's own styles and inline images, and open links in a new tab;
# nothing else: no scripts, no requests, no access to this origin.
HTML_CSP = (
    "sandbox allow-popups allow-popups-to-escape-sandbox; default-src 'none'; "
    "style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'; base-uri 'none'; "
    "form-action 'none'"
)


@dataclass(frozen=True, slots=True)
class Check:
    label: str
    ok: bool
    detail: str


def unsubscribe_checks(message: EmailMessage) -> list[Check]:
    """RFC 2369/8058 as the big mailbox providers enforce them."""
    header = " ".join(str(message.get("List-Unsubscribe", "")).split())
    targets = _ANGLE.findall(header)
    https = [t for t in targets if t.lower().startswith("https://")]
    mailto = [t for t in targets if t.lower().startswith("mailto:")]
    post = str(message.get("List-Unsubscribe-Post", ""))
    return [
        Check(
            "List-Unsubscribe has an https link",
            bool(https),
            https[0] if https else (header or "header missing"),
        ),
        Check(
            "List-Unsubscribe has a mailto link",
            bool(mailto),
            mailto[0] if mailto else (header or "header missing"),
        ),
        Check(
            "List-Unsubscribe-Post is List-Unsubscribe=One-Click",
            post == "List-Unsubscribe=One-Click",
            post or "header missing",
        ),
    ]


def _part(message: EmailMessage, subtype: str) -> str | None:
    part = message.get_body(preferencelist=(subtype,))
    if part is None or part.get_content_type() != f"text/{subtype}":
        return None
    try:
        content = part.get_content()
    except (LookupError, ValueError):
        return None
    return content if isinstance(content, str) else None


def _links(text: str | None) -> list[str]:
    seen: list[str] = []
    for url in _URL.findall(text or ""):
        url = url.rstrip(".,;:)]")
        if url not in seen:
            seen.append(url)
    return seen


def _frameable(html: str) -> str:
    # Links open in a new tab: the frame itself may not navigate to our pages, which refuse
    # to be framed. After <head>, so that a leading <!DOCTYPE> keeps its meaning.
    base = '<base target="_blank">'
    head = _HEAD.search(html)
    if head is None:
        return base + html
    return html[: head.end()] + base + html[head.end() :]


def routes(web: WebContext, sink_dir: Path) -> list[BaseRoute]:
    def load_all() -> list[SinkMessage]:
        return list(reversed(list_messages(sink_dir)))

    async def find(key: str) -> SinkMessage:
        for message in await run_in_threadpool(load_all):
            if message.key == key:
                return message
        raise HTTPException(404, detail="There is no message with this key in the sink.")

    async def sink_list(request: Request) -> Response:
        messages = await run_in_threadpool(load_all)
        return web.render(
            request, "sink_list.html", {"messages": messages, "sink_dir": str(sink_dir)}
        )

    async def sink_message(request: Request) -> Response:
        message = await find(request.path_params["key"])
        text = _part(message.message, "plain")
        html = _part(message.message, "html")
        raw = message.raw[:RAW_SHOWN].decode("utf-8", "replace")
        nonce = csp_nonce(request)
        return web.render(
            request,
            "sink_message.html",
            {
                "m": message,
                "headers": [(k, str(v)) for k, v in message.message.items()],
                "checks": unsubscribe_checks(message.message),
                "text": text,
                "has_html": html is not None,
                "links": _links(text),
                "raw": raw,
                "raw_cut": len(message.raw) > RAW_SHOWN,
            },
            headers={"Content-Security-Policy": content_security_policy(nonce, frame_src="'self'")},
        )

    async def sink_html(request: Request) -> Response:
        message = await find(request.path_params["key"])
        html = _part(message.message, "html")
        if html is None:
            raise HTTPException(404, detail="This message has no HTML part.")
        return HTMLResponse(
            _frameable(html),
            headers={"Content-Security-Policy": HTML_CSP, "X-Frame-Options": "SAMEORIGIN"},
        )

    return [
        Route("/_sink", sink_list, methods=["GET"]),
        Route("/_sink/{key}", sink_message, methods=["GET"]),
        Route("/_sink/{key}/html", sink_html, methods=["GET"]),
    ]
