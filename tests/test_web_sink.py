"""The development mail viewer at /_sink: lists what the real sink caught, shows each message
safely, and checks its unsubscribe headers."""

from __future__ import annotations

from urllib.parse import quote

from test_web_support import link_path, open_site

from newsletter.models import SubscriberStatus
from newsletter.sink import Sink


def test_mail_viewer_lists_shows_and_checks(sqlite_url: str, sink: Sink) -> None:
    with open_site(sqlite_url, sink, sink_dir=sink.maildir) as site:
        site.subscribe("ada@example.org", "equivariant")
        [confirm] = site.mails("ada@example.org")
        site.post(link_path(confirm, "confirm"), {})
        confirm, welcome = site.mails("ada@example.org")

        listing = site.client.get("/_sink")
        assert listing.status_code == 200
        text = listing.text
        assert "2 messages" in text
        # Newest first.
        assert text.index("You are subscribed to the paper digest") < text.index(
            "Confirm your paper digest subscription"
        )
        assert f'href="/_sink/{quote(welcome.key)}"' in text

        shown = site.client.get(f"/_sink/{quote(welcome.key)}")
        assert shown.status_code == 200
        assert shown.text.count(">pass<") == 3 and ">fail<" not in shown.text
        assert f'src="/_sink/{quote(welcome.key)}/html"' in shown.text
        assert 'sandbox="allow-popups allow-popups-to-escape-sandbox"' in shown.text
        assert "frame-src 'self'" in shown.headers["content-security-policy"]
        assert "Welcome! Your subscription is confirmed." in shown.text  # the text part
        assert "List-Unsubscribe-Post" in shown.text  # the headers table
        assert "https://digest.example.org/manage/" in shown.text  # links, clickable

        # A confirmation is not bulk mail and has no unsubscribe headers: shown as failing.
        plain = site.client.get(f"/_sink/{quote(confirm.key)}")
        assert plain.text.count(">fail<") == 3

        html = site.client.get(f"/_sink/{quote(welcome.key)}/html")
        assert html.status_code == 200
        csp = html.headers["content-security-policy"]
        assert csp.startswith("sandbox ") and "default-src 'none'" in csp
        assert "script-src" not in csp and "frame-ancestors 'self'" in csp
        assert html.text.index('<base target="_blank">') > html.text.lower().index("<head")
        assert html.text.lstrip().lower().startswith("<!doctype html>")

        for bad in ("nope", "..%2F..%2Fetc%2Fpasswd", quote(welcome.key) + "x"):
            assert site.client.get(f"/_sink/{bad}").status_code == 404
        sub = site.subscriber("ada@example.org")
        assert sub is not None and sub.status is SubscriberStatus.ACTIVE


def test_mail_viewer_exists_only_with_a_sink_dir(sqlite_url: str, sink: Sink) -> None:
    with open_site(sqlite_url, sink) as site:
        site.subscribe("ada@example.org", "equivariant")
        key = site.mails()[0].key
        for path in ("/_sink", f"/_sink/{quote(key)}", f"/_sink/{quote(key)}/html"):
            assert site.client.get(path).status_code == 404
        assert "/_sink" not in site.client.get("/").text
