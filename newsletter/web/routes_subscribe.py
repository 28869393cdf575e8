"""Subscribing with double opt-in: the form, "check your inbox", and the confirm link.

Nothing a stranger types can change an active subscription: for an address we already know,
the form only (re)sends a link to that address, and the page says the same thing whatever
the address is. Confirmation happens on POST from a page with a button, because mail scanners
fetch every link in an email with GET.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute

from newsletter import db, subscribers
from newsletter.models import SubscriberStatus, utcnow
from newsletter.notices import Outgoing, Recipient
from newsletter.subscribers import ProfileSpec
from newsletter.tokens import Purpose
from newsletter.web.context import SUBSCRIBE_AGAIN, LinkProblem, WebContext, page_route
from newsletter.web.forms import ProfileForm, blank_form, validate

_LIVE = (SubscriberStatus.ACTIVE, SubscriberStatus.PAUSED)


@dataclass(frozen=True, slots=True)
class _Confirmation:
    email: str
    keywords: tuple[str, ...]
    exclude: tuple[str, ...]
    send_hour: int
    timezone: str
    already: bool
    manage_path: str
    unsubscribe_path: str


def routes(web: WebContext) -> list[BaseRoute]:
    async def subscribe_page(request: Request) -> Response:
        return _form_page(web, request, blank_form(), status=200, guess_timezone=True)

    async def subscribe(request: Request) -> Response:
        raw = await web.checked_form(request)
        form = validate(raw)
        if raw.get("action") == "preview":
            limited = web.limits.preview_request(request)
            if limited:
                return web.too_many(request, limited)
            preview = await web.preview(
                form.keyword_list(), form.keyword_list("exclude"), form.max_items()
            )
            # Nothing is submitted yet: only say what is wrong with the keywords themselves.
            shown = {k: v for k, v in form.errors.items() if k in ("keywords", "exclude")}
            return _form_page(web, request, form, errors=shown, preview=preview, status=200)
        limited = web.limits.client(request, "subscribe")
        if limited:
            return web.too_many(request, limited)
        if not form.ok or form.spec is None:
            return _form_page(web, request, form, status=400)
        spec = form.spec
        limited = web.limits.address(spec.email, "subscribe")
        if limited:
            return web.too_many(request, limited)
        outgoing = await run_in_threadpool(_subscribe, web, spec)
        return web.render(
            request,
            "check_inbox.html",
            {"email": spec.email, "reason": "subscribe"},
            background=web.deliver_later(outgoing),
        )

    async def confirm_page(request: Request) -> Response:
        token = request.path_params["token"]
        try:
            info, _ = await run_in_threadpool(_confirmation, web, token, False)
        except LinkProblem as problem:
            return web.problem(request, problem)
        return web.render(request, "confirm.html", {"info": info, "token": token})

    async def confirm(request: Request) -> Response:
        await web.checked_form(request)
        token = request.path_params["token"]
        try:
            info, outgoing = await run_in_threadpool(_confirmation, web, token, True)
        except LinkProblem as problem:
            return web.problem(request, problem)
        preview = await web.preview(info.keywords, info.exclude, 5)
        return web.render(
            request,
            "welcome.html",
            {"info": info, "preview": preview},
            background=web.deliver_later(outgoing),
        )

    return [
        page_route("/", subscribe_page, subscribe),
        page_route("/confirm/{token}", confirm_page, confirm),
    ]


def _form_page(
    web: WebContext,
    request: Request,
    form: ProfileForm,
    *,
    status: int,
    errors: dict[str, str] | None = None,
    preview: object = None,
    guess_timezone: bool = False,
) -> HTMLResponse:
    return web.render(
        request,
        "subscribe.html",
        {
            "form": form,
            "errors": form.errors if errors is None else errors,
            "preview": preview,
            "guess_timezone": guess_timezone,
        },
        status=status,
    )


def _subscribe(web: WebContext, spec: ProfileSpec) -> list[Outgoing]:
    """Decide what this form may do to the address, and which email (if any) goes out."""
    for attempt in range(2):
        try:
            return _subscribe_once(web, spec)
        except IntegrityError:
            # Two forms for one new address raced to insert it; the retry sees the winner's row.
            if attempt:
                raise
    raise AssertionError("unreachable")


def _subscribe_once(web: WebContext, spec: ProfileSpec) -> list[Outgoing]:
    now = utcnow()
    with db.transaction(web.app.sessions) as session:
        sub = web.find(session, spec.email)
        if sub is not None:
            if web.in_cooldown(sub, now) or sub.status is SubscriberStatus.BOUNCED:
                # Bounced: the mail server refused this address; only the operator lifts that.
                return []
            if sub.status in _LIVE:
                # Never overwrite or downgrade a confirmed subscription from a public form:
                # remind its owner where their settings are instead.
                sub.link_sent_at = now
                return [web.notices.manage_link(Recipient.of(sub), now)]
        # New, pending or unsubscribed: the profile is the form's, and it waits for a click.
        sub, _ = subscribers.upsert(session, spec, status=SubscriberStatus.PENDING)
        sub.status_reason = None
        sub.link_sent_at = now
        return [web.notices.confirm(Recipient.of(sub), now)]


def _confirmation(
    web: WebContext, token: str, activate: bool
) -> tuple[_Confirmation, list[Outgoing]]:
    """What the confirm link is for; with `activate`, also confirm it (once: a second click
    or a double submit finds it active and sends no second welcome)."""
    with db.transaction(web.app.sessions) as session:
        sub = web.subscriber_for(session, Purpose.CONFIRM, token, lock=activate)
        if sub.status not in (SubscriberStatus.PENDING, *_LIVE):
            raise LinkProblem(
                400,
                "This link is no longer valid",
                "This subscription was ended after the link was sent. If you want the digest "
                "again, subscribe once more.",
                SUBSCRIBE_AGAIN,
            )
        already = sub.status in _LIVE
        outgoing = []
        if activate and not already:
            now = utcnow()
            sub.status = SubscriberStatus.ACTIVE
            sub.confirmed_at = now
            sub.status_reason = None
            outgoing.append(web.notices.welcome(Recipient.of(sub), now))
        info = _Confirmation(
            email=sub.email,
            keywords=tuple(sub.keywords),
            exclude=tuple(sub.exclude),
            send_hour=sub.send_hour,
            timezone=sub.timezone,
            already=already,
            manage_path=web.manage_path(sub),
            unsubscribe_path=web.unsubscribe_path(sub),
        )
        return info, outgoing
