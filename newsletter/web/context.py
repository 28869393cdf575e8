"""What every route needs, made once per web app: settings, pages, limits, signer, mailer.

The secret key is read lazily, so building the app (and serving /healthz through it) works
before `newsletter init`; only pages that sign or check something need the key.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import parseaddr
from functools import cached_property
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from newsletter import db
from newsletter.app import App
from newsletter.mailer import Outcome
from newsletter.models import Subscriber
from newsletter.notices import Notices, Outgoing
from newsletter.tokens import InvalidToken, Purpose, Signer
from newsletter.web.forms import read_form
from newsletter.web.pages import Pages
from newsletter.web.preview import Preview, RecentPapers
from newsletter.web.ratelimit import Limited, RateLimits
from newsletter.web.security import Csrf, CsrfError, allowed_origins

log = logging.getLogger(__name__)

MAX_TOKEN_CHARS = 512  # real ones are under 100; refuse junk before any crypto


@dataclass(frozen=True, slots=True)
class NextStep:
    href: str
    label: str


class LinkProblem(Exception):
    """A link that cannot be used, with what the person can do about it."""

    def __init__(self, status: int, title: str, message: str, next_step: NextStep) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.message = message
        self.next_step = next_step


NEW_LINK = NextStep("/link", "Email me a new link")
SUBSCRIBE_AGAIN = NextStep("/", "Subscribe again")
_NEXT_STEP = {
    Purpose.CONFIRM: SUBSCRIBE_AGAIN,
    Purpose.MANAGE: NEW_LINK,
    Purpose.UNSUBSCRIBE: NEW_LINK,
}
_WHAT = {
    Purpose.CONFIRM: "confirmation link",
    Purpose.MANAGE: "settings link",
    Purpose.UNSUBSCRIBE: "unsubscribe link",
}


class WebContext:
    def __init__(self, app: App, *, sink_dir: Path | None) -> None:
        self.app = app
        self.settings = app.settings
        self.sink_dir = sink_dir
        self.site_name = parseaddr(self.settings.from_addr)[0] or "Paper Digest"
        self.pages = Pages(
            self.settings,
            site_name=self.site_name,
            sink_enabled=sink_dir is not None,
            csrf=lambda: self.csrf,
        )
        self.limits = RateLimits(
            self.settings.rate_limit_per_client, self.settings.rate_limit_per_address
        )
        self.recent = RecentPapers(app)

    @cached_property
    def signer(self) -> Signer:
        return Signer(self.app.secret_key)

    @cached_property
    def csrf(self) -> Csrf:
        return Csrf(self.app.secret_key)

    @cached_property
    def notices(self) -> Notices:
        return Notices(self.settings, self.app.secret_key)

    def render(
        self,
        request: Request,
        name: str,
        context: dict[str, object] | None = None,
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
        background: BackgroundTask | None = None,
    ) -> HTMLResponse:
        response = self.pages.render(request, name, context, status=status, headers=headers)
        response.background = background
        return response

    # -- forms ---------------------------------------------------------------------------

    async def checked_form(self, request: Request) -> dict[str, str]:
        """The form of a POST from one of our own pages, or 403."""
        form = await read_form(request)
        try:
            self.csrf.check(request, form, allowed_origins(request, self.settings.base_url))
        except CsrfError as exc:
            raise HTTPException(403, detail=str(exc)) from None
        return form

    def too_many(self, request: Request, limited: Limited) -> HTMLResponse:
        minutes = max(1, round(limited.retry_after / 60))
        wait = "a minute" if minutes == 1 else f"{minutes} minutes"
        return self.render(
            request,
            "error.html",
            {
                "title": "Too many requests",
                "message": f"We got too many requests like this one. Please wait {wait} and "
                "try again.",
                "next_step": None,
            },
            status=429,
            headers={"Retry-After": str(limited.retry_after)},
        )

    def problem(self, request: Request, problem: LinkProblem) -> HTMLResponse:
        return self.render(
            request,
            "error.html",
            {"title": problem.title, "message": problem.message, "next_step": problem.next_step},
            status=problem.status,
        )

    # -- links -----------------------------------------------------------------------------

    def subscriber_for(
        self, session: Session, purpose: Purpose, token: str, *, lock: bool = False
    ) -> Subscriber:
        """The subscriber a signed link was made for, or a LinkProblem saying what to do."""
        what = _WHAT[purpose]
        next_step = _NEXT_STEP[purpose]
        if len(token) > MAX_TOKEN_CHARS:
            raise LinkProblem(400, "This link is not valid", _garbled(what), next_step)
        try:
            data = self.signer.read(purpose, token)
        except InvalidToken as exc:
            if "expired" in str(exc):
                raise LinkProblem(
                    400,
                    "This link has expired",
                    f"This {what} is too old to use. {_expired_hint(purpose)}",
                    next_step,
                ) from None
            raise LinkProblem(400, "This link is not valid", _garbled(what), next_step) from None
        sub = session.get(Subscriber, data.subscriber_id, with_for_update=lock)
        if sub is None or not self.signer.matches(data, sub.email):
            raise LinkProblem(
                404,
                "We could not find this subscription",
                f"This {what} belongs to a subscription that no longer exists.",
                SUBSCRIBE_AGAIN,
            )
        return sub

    def manage_path(self, sub: Subscriber) -> str:
        return "/manage/" + self.signer.make(Purpose.MANAGE, sub.id, sub.email)

    def unsubscribe_path(self, sub: Subscriber) -> str:
        return "/unsubscribe/" + self.signer.make(Purpose.UNSUBSCRIBE, sub.id, sub.email)

    # -- work in threads -----------------------------------------------------------------

    async def preview(
        self, keywords: Sequence[str], exclude: Sequence[str], max_items: int
    ) -> Preview:
        return await run_in_threadpool(self.recent.preview, keywords, exclude, max_items)

    def deliver_later(self, outgoing: Sequence[Outgoing]) -> BackgroundTask | None:
        """Send after the response: the page then answers in the same time whether or not an
        email goes out, so timing does not tell anyone whether an address is known."""
        if not outgoing:
            return None
        return BackgroundTask(self._deliver, list(outgoing))

    async def _deliver(self, outgoing: list[Outgoing]) -> None:
        for item in outgoing:
            try:
                result = await self.notices.send_async(item)
            except Exception:
                log.exception("sending the %s notice to %s failed", item.kind, item.to)
                continue
            if result.outcome is not Outcome.SENT and item.kind in ("confirm", "manage_link"):
                # Nothing reached them: let them ask again at once rather than after the
                # cooldown.
                await run_in_threadpool(self._forget_link_sent, item.to)

    def _forget_link_sent(self, email: str) -> None:
        with db.transaction(self.app.sessions) as session:
            session.execute(
                update(Subscriber).where(Subscriber.email == email).values(link_sent_at=None)
            )

    def find(self, session: Session, email: str) -> Subscriber | None:
        """By address, locked for the rest of the transaction where the database can."""
        return session.scalar(select(Subscriber).where(Subscriber.email == email).with_for_update())

    def in_cooldown(self, sub: Subscriber, now: datetime) -> bool:
        sent = sub.link_sent_at
        return sent is not None and (now - sent).total_seconds() < (
            self.settings.link_cooldown_seconds
        )


Endpoint = Callable[[Request], Awaitable[Response]]


def page_route(path: str, get: Endpoint, post: Endpoint | None = None) -> Route:
    """One route per URL, so that a 405 names every method the URL takes (Allow)."""
    if post is None:
        return Route(path, get, methods=["GET"])
    form_post = post

    async def endpoint(request: Request) -> Response:
        return await (form_post(request) if request.method == "POST" else get(request))

    return Route(path, endpoint, methods=["GET", "POST"])


def _garbled(what: str) -> str:
    return (
        f"This {what} is incomplete or was changed. If you copied it from an email, make sure "
        "you copied all of it."
    )


def _expired_hint(purpose: Purpose) -> str:
    if purpose is Purpose.CONFIRM:
        return "Confirmation links work for 48 hours; subscribe again and we will send a new one."
    return "Ask for a new one and we will email it to you."
