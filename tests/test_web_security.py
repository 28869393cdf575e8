"""The web app on the open internet: tokens, CSRF, enumeration, rate limits, unsubscribe
semantics, headers and hostile input. Real app, real database, real SMTP sink."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import make_settings
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from test_web_support import (
    BASE,
    Site,
    TestClient,
    free_port,
    link_path,
    open_site,
    page,
    running_server,
)

from newsletter.app import App
from newsletter.models import SubscriberStatus
from newsletter.sink import Sink
from newsletter.tokens import Purpose, Signer, email_fingerprint
from newsletter.web import create_app

ONE_CLICK = {"List-Unsubscribe": "One-Click"}


@pytest.fixture
def site(db_url: str, sink: Sink) -> Iterator[Site]:
    with open_site(db_url, sink) as s:
        yield s


@pytest.fixture
def lite(sqlite_url: str, sink: Sink) -> Iterator[Site]:
    """For checks that do not depend on the database engine."""
    with open_site(sqlite_url, sink) as s:
        yield s


def _expired(site: Site, purpose: Purpose, sub_id: int, email: str) -> str:
    """A correctly signed token made three days ago (confirm links last two)."""

    class ThreeDaysAgo(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - 3 * 24 * 3600

    secret = site.app.secret_key
    serializer = URLSafeTimedSerializer(
        secret, salt=f"newsletter.{purpose.value}", signer=ThreeDaysAgo
    )
    return str(serializer.dumps([sub_id, email_fingerprint(secret, email)]))


def _assert_secure_headers(response: httpx.Response) -> None:
    csp = response.headers["content-security-policy"]
    for part in (
        "default-src 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ):
        assert part in csp, (part, response.url)
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"


def test_security_headers_on_every_response(site: Site) -> None:
    sub = site.add("ada@example.org", ["equivariant"])
    responses = [
        site.client.get("/"),
        site.client.get("/link"),
        site.client.get("/no/such/page"),
        site.client.get(f"/manage/{site.token(Purpose.MANAGE, sub)}"),
        site.client.get(f"/unsubscribe/{site.token(Purpose.UNSUBSCRIBE, sub)}"),
        site.client.get(f"/confirm/{site.token(Purpose.CONFIRM, sub)}"),
        site.client.get("/manage/forged"),
        site.client.post("/", data={"email": "x@example.org"}),  # 403
        site.client.post(f"/unsubscribe/{site.token(Purpose.UNSUBSCRIBE, sub)}", data=ONE_CLICK),
    ]
    assert [r.status_code for r in responses] == [200, 200, 404, 200, 200, 200, 400, 403, 200]
    for response in responses:
        _assert_secure_headers(response)
    first = responses[0]
    nonce = first.headers["content-security-policy"].split("'nonce-")[1].split("'")[0]
    assert f'<style nonce="{nonce}">' in first.text and f'<script nonce="{nonce}">' in first.text
    assert first.headers["strict-transport-security"].startswith("max-age=")
    cookie = first.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" in cookie


def test_extra_routes_are_served_first_and_get_the_headers(sqlite_url: str, sink: Sink) -> None:
    async def healthz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = App(make_settings(sqlite_url, sink.port))  # not initialized: no secret key yet
    web = create_app(app, extra_routes=[Route("/healthz", healthz), Route("/", healthz)])
    with TestClient(web) as client:
        for path in ("/healthz", "/"):
            answer = client.get(path)
            assert answer.text == "ok"
            assert answer.headers["x-content-type-options"] == "nosniff"
        assert client.get("/_sink").status_code == 404  # no sink_dir, no mail viewer
    app.close()


def test_server_errors_are_friendly_and_keep_the_headers(sqlite_url: str, sink: Sink) -> None:
    app = App(make_settings(sqlite_url, sink.port))  # never initialized: no tables
    token = Signer(app.settings.secret_key).make(Purpose.MANAGE, 1, "ada@example.org")
    with TestClient(create_app(app), raise_server_exceptions=False) as client:
        answer = client.get(f"/manage/{token}")
    app.close()
    assert answer.status_code == 500
    assert "Something went wrong on our side" in answer.text and "Traceback" not in answer.text
    _assert_secure_headers(answer)


def test_forged_expired_and_cross_purpose_tokens(site: Site) -> None:
    sub = site.add("ada@example.org", ["equivariant"], status=SubscriberStatus.PENDING)
    confirm = site.token(Purpose.CONFIRM, sub)
    manage = site.token(Purpose.MANAGE, sub)
    unsubscribe = site.token(Purpose.UNSUBSCRIBE, sub)
    forged = manage[:-3] + ("AAA" if not manage.endswith("AAA") else "BBB")

    cases = {
        f"/manage/{forged}": (400, "not valid", "/link"),
        f"/manage/{'x' * 5000}": (400, "not valid", "/link"),
        "/manage/%00%0d%0a": (400, "not valid", "/link"),
        f"/confirm/{_expired(site, Purpose.CONFIRM, sub.id, sub.email)}": (
            400,
            "expired",
            'href="/"',
        ),
        f"/manage/{unsubscribe}": (400, "not valid", "/link"),
        f"/unsubscribe/{manage}": (400, "not valid", "/link"),
        f"/confirm/{manage}": (400, "not valid", 'href="/"'),
        f"/manage/{confirm}": (400, "not valid", "/link"),
    }
    for path, (status, words, next_step) in cases.items():
        answer = site.client.get(path)
        assert answer.status_code == status, path
        assert words in answer.text and next_step in answer.text, path
        _assert_secure_headers(answer)

    # POSTs with bad tokens fail the same way (with a valid form token), and change nothing.
    assert site.post(f"/confirm/{manage}", {}).status_code == 400
    assert site.client.post(f"/unsubscribe/{confirm}", data=ONE_CLICK).status_code == 400
    row = site.subscriber("ada@example.org")
    assert row is not None and row.status is SubscriberStatus.PENDING
    # Still-valid tokens of other kinds do work, so the failures above were about the kind.
    assert site.client.get(f"/confirm/{confirm}").status_code == 200


def test_csrf_is_required_on_every_form_post(site: Site) -> None:
    sub = site.add("ada@example.org", ["equivariant"])
    manage = f"/manage/{site.token(Purpose.MANAGE, sub)}"
    unsubscribe = f"/unsubscribe/{site.token(Purpose.UNSUBSCRIBE, sub)}"
    confirm = f"/confirm/{site.token(Purpose.CONFIRM, sub)}"
    good = site.csrf("/")
    forms = {
        "/": {"email": "new@example.org", "keywords": "x"},
        "/link": {"email": "ada@example.org"},
        manage: {"keywords": "hijacked", "frequency": "daily"},
        unsubscribe: {},
        confirm: {},
        "/preview": {"keywords": "x"},
    }
    for path, data in forms.items():
        missing = site.client.post(path, data=data)
        wrong = site.client.post(path, data={**data, "csrf_token": good[:-2] + "xx"})
        cross_site = site.client.post(
            path, data={**data, "csrf_token": good}, headers={"Origin": "https://evil.example"}
        )
        for answer in (missing, wrong, cross_site):
            assert answer.status_code == 403, path
            assert "We could not accept this form" in answer.text
    # A token minted for another browser's cookie is refused too.
    with TestClient(site.web, base_url=BASE) as stranger:
        stranger.get("/")  # has a cookie of its own now
        stolen = stranger.post(
            "/", data={"email": "n@example.org", "keywords": "x", "csrf_token": good}
        )
        assert stolen.status_code == 403

    row = site.subscriber("ada@example.org")
    assert row is not None and row.status is SubscriberStatus.ACTIVE
    assert row.keywords == ["equivariant"]
    assert site.subscriber("new@example.org") is None
    assert site.mails() == []
    # The browser's own form with the right token, sent as a same-origin request, works.
    ok = site.client.post(
        "/link",
        data={"email": "ada@example.org", "csrf_token": good},
        headers={"Origin": "https://testserver", "Sec-Fetch-Site": "same-origin"},
    )
    assert ok.status_code == 200


def test_get_never_unsubscribes(site: Site) -> None:
    sub = site.add("ada@example.org", ["equivariant"])
    path = f"/unsubscribe/{site.token(Purpose.UNSUBSCRIBE, sub)}"
    for _ in range(3):
        shown = site.client.get(path)
        assert shown.status_code == 200 and "Unsubscribe?" in shown.text
        assert shown.text.count("<button") == 1
    assert site.client.head(path).status_code == 200
    row = site.subscriber("ada@example.org")
    assert row is not None and row.status is SubscriberStatus.ACTIVE

    done = site.post(path, {}, token_from=path)
    assert done.status_code == 200 and "You are unsubscribed" in done.text
    row = site.subscriber("ada@example.org")
    assert row is not None and row.status is SubscriberStatus.UNSUBSCRIBED
    assert "You were already unsubscribed" in site.client.get(path).text


def test_one_click_unsubscribe_rfc8058(site: Site) -> None:
    """As a mailbox provider sends it: no cookie, no CSRF token, urlencoded or multipart."""
    ada = site.add("ada@example.org", ["equivariant"])
    bob = site.add("bob@example.org", ["equivariant"])
    raw = TestClient(site.web, base_url=BASE)  # a mail provider: no cookie, no form token
    ada_url = f"/unsubscribe/{site.token(Purpose.UNSUBSCRIBE, ada)}"
    for _ in range(2):  # idempotent
        answer = raw.post(ada_url, data=ONE_CLICK, follow_redirects=False)
        assert answer.status_code == 200
        assert "location" not in answer.headers and "set-cookie" not in answer.headers
    row = site.subscriber("ada@example.org")
    assert row is not None and row.status is SubscriberStatus.UNSUBSCRIBED
    assert row.status_reason is not None and "RFC 8058" in row.status_reason

    bob_url = f"/unsubscribe/{site.token(Purpose.UNSUBSCRIBE, bob)}"
    multipart = raw.post(bob_url, files={"List-Unsubscribe": (None, "One-Click")})
    assert multipart.status_code == 200
    row = site.subscriber("bob@example.org")
    assert row is not None and row.status is SubscriberStatus.UNSUBSCRIBED

    # Anything else on that URL without a form token is refused, not taken as one-click.
    cy = site.add("cy@example.org", ["equivariant"])
    cy_url = f"/unsubscribe/{site.token(Purpose.UNSUBSCRIBE, cy)}"
    assert raw.post(cy_url, data={"List-Unsubscribe": "Yes"}).status_code == 403
    row = site.subscriber("cy@example.org")
    assert row is not None and row.status is SubscriberStatus.ACTIVE
    raw.close()


def test_subscribe_and_link_answer_alike_for_known_and_unknown(site: Site) -> None:
    site.add("known@example.org", ["equivariant"])
    site.add("pause@example.org", ["equivariant"], status=SubscriberStatus.PAUSED)
    for path, form in (
        ("/", {"keywords": "diffusion models"}),
        ("/link", {}),
    ):
        answers = {
            email: site.post(path, {**form, "email": email})
            for email in ("known@example.org", "other@example.org", "pause@example.org")
        }
        statuses = {a.status_code for a in answers.values()}
        assert statuses == {200}
        bodies = {page(a.text, email) for email, a in answers.items()}
        assert len(bodies) == 1, path
        header_sets = {
            tuple(sorted(k for k in a.headers if k not in ("date",))) for a in answers.values()
        }
        assert len(header_sets) == 1
        lengths = {a.headers["content-length"] for a in answers.values()}
        assert len(lengths) == 1
    # What actually happened differs, but only the inbox owners can see it.
    assert [m.subject for m in site.mails("known@example.org")] == [
        "Your paper digest settings link"
    ]
    assert [m.subject for m in site.mails("other@example.org")] == [
        "Confirm your paper digest subscription"
    ]
    known = site.subscriber("known@example.org")
    assert known is not None and known.status is SubscriberStatus.ACTIVE


def test_link_request_mails_only_live_subscribers(db_url: str, sink: Sink) -> None:
    with open_site(db_url, sink, link_cooldown_seconds=3600) as site:
        site.add("act@example.org", ["x"])
        site.add("pau@example.org", ["x"], status=SubscriberStatus.PAUSED)
        site.add("pen@example.org", ["x"], status=SubscriberStatus.PENDING)
        site.add("uns@example.org", ["x"], status=SubscriberStatus.UNSUBSCRIBED)
        site.add("bou@example.org", ["x"], status=SubscriberStatus.BOUNCED)
        for email in ("act", "pau", "pen", "uns", "bou", "nob"):
            for _ in range(2):  # the second falls in the cooldown
                answer = site.post("/link", {"email": f"{email}@example.org"})
                assert answer.status_code == 200 and "Check your inbox" in answer.text
        got = sorted(r for m in site.mails() for r in m.rcpt_tos)
        assert got == ["act@example.org", "pau@example.org"]
        mail = site.mails("act@example.org")[0]
        assert "/manage/" in link_path(mail, "manage")
        assert mail.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"

        bad = site.post("/link", {"email": "not an address"})
        assert bad.status_code == 400 and 'id="email-error"' in bad.text


def test_rate_limit_per_client(sqlite_url: str, sink: Sink) -> None:
    with open_site(sqlite_url, sink, rate_limit_per_client="3/minute") as site:
        token = site.csrf("/")
        answers = [
            site.client.post(
                "/", data={"email": f"p{i}@example.org", "keywords": "x", "csrf_token": token}
            )
            for i in range(4)
        ]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert "Too many requests" in answers[-1].text
        assert 0 < int(answers[-1].headers["retry-after"]) <= 60
        assert site.subscriber("p3@example.org") is None
        # Each form has its own budget: the link form still works for this client.
        link = site.client.post("/link", data={"email": "p0@example.org", "csrf_token": token})
        assert link.status_code == 200


def test_rate_limit_per_address(sqlite_url: str, sink: Sink) -> None:
    with open_site(
        sqlite_url, sink, rate_limit_per_address="2/hour", link_cooldown_seconds=0
    ) as site:
        site.add("known@example.org", ["x"])
        for email in ("known@example.org", "other@example.org"):
            codes = [site.subscribe(email, "x").status_code for _ in range(3)]
            assert codes == [200, 200, 429], email
        assert len(site.mails("known@example.org")) == 2
        assert len(site.mails("other@example.org")) == 2
        assert site.subscribe("third@example.org", "x").status_code == 200
        link_codes = [
            site.post("/link", {"email": "known@example.org"}).status_code for _ in range(3)
        ]
        assert link_codes == [200, 200, 429]


def test_hostile_input_never_reaches_headers_or_pages(lite: Site) -> None:
    site = lite
    injected = site.subscribe("ada@example.org\r\nBcc: victim@example.org", "x")
    assert injected.status_code == 400 and 'id="email-error"' in injected.text
    control = site.subscribe("ada@example.org", "ok\x00bad")
    assert control.status_code == 400 and "control character" in control.text
    script = site.subscribe('"><script>alert(1)</script>@x.org', "<img src=x onerror=alert(1)>")
    assert script.status_code == 400
    assert "<script>alert(1)" not in script.text and "<img src=x" not in script.text
    assert "&lt;script&gt;" in script.text
    assert site.mails() == []

    huge = site.client.post(
        "/",
        content=b"email=" + b"a" * 200_000,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert huge.status_code == 413
    _assert_secure_headers(huge)

    fields = {f"f{i}": "x" for i in range(100)}
    assert site.client.post("/", data={**fields, "csrf_token": site.csrf()}).status_code == 400
    upload = site.client.post("/", data={"csrf_token": site.csrf()}, files={"email": ("a", b"x")})
    assert upload.status_code == 400
    wrong_method = site.client.put("/")
    assert wrong_method.status_code == 405
    assert set(wrong_method.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}

    too_many_keywords = ",".join(f"word{i}" for i in range(60))
    answer = site.subscribe("ada@example.org", too_many_keywords)
    assert answer.status_code == 400 and "At most 50 entries" in answer.text


def test_real_server_one_click_and_headers(sqlite_url: str, sink: Sink) -> None:
    """Over real HTTP through uvicorn, as a mail provider's unsubscribe robot would."""
    with open_site(sqlite_url, sink) as site:
        sub = site.add("ada@example.org", ["x"])
        with running_server(site.web, free_port()) as base:
            url = f"{base}/unsubscribe/{site.token(Purpose.UNSUBSCRIBE, sub)}"
            answer = httpx.post(url, data=ONE_CLICK, follow_redirects=False, timeout=10)
            assert answer.status_code == 200
            assert answer.headers["referrer-policy"] == "no-referrer"
            assert answer.text == "You are unsubscribed.\n"
        row = site.subscriber("ada@example.org")
        assert row is not None and row.status is SubscriberStatus.UNSUBSCRIBED
