"""Leaving, and finding the way back: unsubscribe links, one-click unsubscribe, lost links.

GET never unsubscribes (link scanners and previews fetch URLs); the page has one button. The
same URL takes the RFC 8058 one-click POST that mail providers send on the reader's behalf:
the body ``List-Unsubscribe=One-Click`` and the signed token are all it has, so it needs no
cookie, gets no redirect, and answers 200 however often it is repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute

from newsletter import db
from newsletter.models import SubscriberStatus, utcnow
from newsletter.notices import Outgoing, Recipient
from newsletter.subscribers import InvalidProfile, validate_email
from newsletter.tokens import Purpose
from newsletter.web.context import LinkProblem, WebContext, page_route
from newsletter.web.forms import FIELD_LIMITS, read_form

ONE_CLICK = ("List-Unsubscribe", "One-Click")
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


@dataclass(frozen=True, slots=True)
class _Leaving:
    email: str
    already: bool
    manage_path: str


def routes(web: WebContext) -> list[BaseRoute]:
    async def unsubscribe_page(request: Request) -> Response:
        token = request.path_params["token"]
        try:
            info = await run_in_threadpool(_leaving, web, token, None)
        except LinkProblem as problem:
            return web.problem(request, problem)
        name = "unsubscribed.html" if info.already else "unsubscribe.html"
        return web.render(request, name, {"info": info, "token": token})

    async def unsubscribe(request: Request) -> Response:
        token = request.path_params["token"]
        if await _is_one_click(request):
            try:
                await run_in_threadpool(_leaving, web, token, "one-click unsubscribe (RFC 8058)")
            except LinkProblem as problem:
                return PlainTextResponse(problem.message + "\n", status_code=problem.status)
            return PlainTextResponse("You are unsubscribed.\n")
        await web.checked_form(request)
        try:
            info = await run_in_threadpool(_leaving, web, token, "unsubscribed on the web page")
        except LinkProblem as problem:
            return web.problem(request, problem)
        return web.render(request, "unsubscribed.html", {"info": info, "token": token})

    async def link_page(request: Request) -> Response:
        return web.render(request, "link.html", {"email": "", "error": None})

    async def link(request: Request) -> Response:
        raw = await web.checked_form(request)
        limited = web.limits.client(request, "link")
        if limited:
            return web.too_many(request, limited)
        typed = raw.get("email", "").strip()
        try:
            email = validate_email(typed[: FIELD_LIMITS["email"] + 1])
        except InvalidProfile as exc:
            message = str(exc).removeprefix("email: ")
            return web.render(request, "link.html", {"email": typed, "error": message}, status=400)
        limited = web.limits.address(email, "link")
        if limited:
            return web.too_many(request, limited)
        outgoing = await run_in_threadpool(_send_link, web, email)
        return web.render(
            request,
            "check_inbox.html",
            {"email": email, "reason": "link"},
            background=web.deliver_later(outgoing),
        )

    return [
        page_route("/unsubscribe/{token}", unsubscribe_page, unsubscribe),
        page_route("/link", link_page, link),
    ]


async def _is_one_click(request: Request) -> bool:
    """RFC 8058 says form-encoded or multipart; some senders of it leave the type out."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith(_FORM_TYPES):
        return (ONE_CLICK[0], ONE_CLICK[1]) in (await read_form(request)).items()
    body = await request.body()
    return ONE_CLICK in parse_qsl(body.decode("utf-8", "replace").strip())


def _leaving(web: WebContext, token: str, reason: str | None) -> _Leaving:
    """With a reason, unsubscribe (again, harmlessly, if already); without, just look."""
    with db.transaction(web.app.sessions) as session:
        sub = web.subscriber_for(session, Purpose.UNSUBSCRIBE, token, lock=reason is not None)
        already = sub.status is SubscriberStatus.UNSUBSCRIBED
        if reason is not None and not already:
            sub.status = SubscriberStatus.UNSUBSCRIBED
            sub.status_reason = reason
        return _Leaving(sub.email, already, web.manage_path(sub))


def _send_link(web: WebContext, email: str) -> list[Outgoing]:
    now = utcnow()
    with db.transaction(web.app.sessions) as session:
        sub = web.find(session, email)
        if sub is None or web.in_cooldown(sub, now):
            return []
        if sub.status not in (SubscriberStatus.ACTIVE, SubscriberStatus.PAUSED):
            return []
        sub.link_sent_at = now
        return [web.notices.manage_link(Recipient.of(sub), now)]
