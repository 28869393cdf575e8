"""The settings page behind the signed link in every digest, and the live preview.

The link is the credential: it names the subscriber and a fingerprint of their address, so it
stops working if the row is deleted and its id reused. Changes are saved on the subscriber row
and apply to the next digest; "Preview" re-renders with what the new keywords would have picked
without saving, with or without JavaScript.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from newsletter import db, subscribers
from newsletter.models import SubscriberStatus, utcnow
from newsletter.tokens import Purpose
from newsletter.web.context import LinkProblem, WebContext, page_route
from newsletter.web.forms import ProfileForm, subscriber_form, validate
from newsletter.web.preview import Preview


@dataclass(frozen=True, slots=True)
class _Account:
    email: str
    status: SubscriberStatus
    status_reason: str | None
    unsubscribe_path: str


def routes(web: WebContext) -> list[BaseRoute]:
    async def manage_page(request: Request) -> Response:
        token = request.path_params["token"]
        try:
            account, form = await run_in_threadpool(_load, web, token)
        except LinkProblem as problem:
            return web.problem(request, problem)
        preview = await _preview(web, form)
        saved = request.query_params.get("saved") == "1"
        return _page(web, request, account, form, preview, token=token, saved=saved)

    async def manage(request: Request) -> Response:
        raw = await web.checked_form(request)
        token = request.path_params["token"]
        try:
            account, _ = await run_in_threadpool(_load, web, token)
        except LinkProblem as problem:
            return web.problem(request, problem)
        form = validate(raw, email=account.email)
        if raw.get("action") == "preview":
            limited = web.limits.preview_request(request)
            if limited:
                return web.too_many(request, limited)
            preview = await _preview(web, form)
            return _page(web, request, account, form, preview, token=token, previewing=True)
        if not form.ok:
            preview = await _preview(web, form)
            return _page(web, request, account, form, preview, token=token, status=400)
        try:
            await run_in_threadpool(_save, web, token, form)
        except LinkProblem as problem:
            return web.problem(request, problem)
        # Post/redirect/get: reloading the page afterwards does not submit the form again.
        return RedirectResponse(f"/manage/{token}?saved=1", status_code=303)

    async def preview_fragment(request: Request) -> Response:
        """The preview alone, for the page's script to swap in while someone types."""
        raw = await web.checked_form(request)
        limited = web.limits.preview_request(request)
        if limited:
            return HTMLResponse(
                web.pages.fragment("_preview_limited.html", {}),
                status_code=429,
                headers={"Retry-After": str(limited.retry_after)},
            )
        form = validate(raw)
        preview = await _preview(web, form)
        return HTMLResponse(web.pages.fragment("_preview.html", {"preview": preview}))

    return [
        page_route("/manage/{token}", manage_page, manage),
        Route("/preview", preview_fragment, methods=["POST"]),
    ]


async def _preview(web: WebContext, form: ProfileForm) -> Preview:
    return await web.preview(form.keyword_list(), form.keyword_list("exclude"), form.max_items())


def _page(
    web: WebContext,
    request: Request,
    account: _Account,
    form: ProfileForm,
    preview: Preview,
    *,
    token: str,
    status: int = 200,
    saved: bool = False,
    previewing: bool = False,
) -> HTMLResponse:
    return web.render(
        request,
        "manage.html",
        {
            "account": account,
            "form": form,
            "errors": form.errors,
            "preview": preview,
            "token": token,
            "saved": saved,
            "previewing": previewing,
        },
        status=status,
    )


def _load(web: WebContext, token: str) -> tuple[_Account, ProfileForm]:
    with web.app.session() as session:
        sub = web.subscriber_for(session, Purpose.MANAGE, token)
        account = _Account(sub.email, sub.status, sub.status_reason, web.unsubscribe_path(sub))
        return account, subscriber_form(sub)


def _save(web: WebContext, token: str, form: ProfileForm) -> None:
    spec = form.spec
    assert spec is not None
    paused = form.values["frequency"] == "paused"
    with db.transaction(web.app.sessions) as session:
        sub = web.subscriber_for(session, Purpose.MANAGE, token, lock=True)
        if paused:
            # Pausing keeps the daily/weekly choice for when they come back.
            spec = dataclasses.replace(spec, frequency=sub.frequency.value)
            status = SubscriberStatus.PAUSED
        elif sub.status is SubscriberStatus.BOUNCED:
            status = SubscriberStatus.BOUNCED  # their server refused mail; the operator decides
        else:
            # Active again, whether paused, unsubscribed or never confirmed: the link came by
            # email to this address, which is as good a confirmation as the confirm link.
            status = SubscriberStatus.ACTIVE
        was = sub.status
        subscribers.upsert(session, spec, status=status)
        if status is not was:
            sub.status_reason = "paused by the subscriber" if paused else None
        if status is SubscriberStatus.ACTIVE and sub.confirmed_at is None:
            sub.confirmed_at = utcnow()
