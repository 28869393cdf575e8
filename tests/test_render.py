from __future__ import annotations

import email
import email.policy
from datetime import UTC, date, datetime
from pathlib import Path

from newsletter.config import Settings
from newsletter.render import Digest, Renderer, make_item, shorten

NOW = datetime(2026, 11, 22, 7, 0, tzinfo=UTC)


def _digest(title: str, summary: str = "We study diffusion models for inverse problems.") -> Digest:
    item = make_item(
        title=title,
        link="https://papers.example.org/x",
        summary=summary,
        hits=[{"keyword": "diffusion models", "title": False, "summary": True}],
        published=datetime(2024, 1, 2, tzinfo=UTC),
        authors=["4 authors"],
        source="Daily Papers",
    )
    return Digest(
        to="ada@example.org",
        period="2026-11-22",
        day=date(2026, 11, 22),
        items=[item],
        manage_url="https://digest.example.org/manage/TOKEN",
        unsubscribe_url="https://digest.example.org/unsubscribe/TOKEN",
        unsubscribe_mailto="mailto:unsubscribe@example.org?subject=unsubscribe%20TOKEN",
        message_id="<digest.2026-11-22.1.abc@example.org>",
    )


def _settings(**kw: object) -> Settings:
    return Settings(from_addr="Paper Digest <digest@example.org>", **kw)  # type: ignore[arg-type]


def test_message_structure_and_headers() -> None:
    renderer = Renderer(_settings())
    raw = renderer.render_bytes(_digest("Light Schrödinger Bridge"), now=NOW)
    msg = email.message_from_bytes(raw, policy=email.policy.strict)
    assert not msg.defects
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert msg["Subject"] == "1 new paper for you · Sun 22 Nov 2026"
    assert msg["From"] == "Paper Digest <digest@example.org>"
    assert msg["Message-ID"] == "<digest.2026-11-22.1.abc@example.org>"
    assert msg["List-Unsubscribe"] == (
        "<https://digest.example.org/unsubscribe/TOKEN>, "
        "<mailto:unsubscribe@example.org?subject=unsubscribe%20TOKEN>"
    )
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["Date"] == "Sun, 22 Nov 2026 07:00:00 +0000"
    for part in msg.iter_parts():
        assert part.get_content_charset() == "utf-8"
        assert "Light Schrödinger Bridge" in part.get_content()
    html = msg.get_body(("html",)).get_content()
    assert "<mark" in html and ">diffusion models</mark>" in html, "matched words highlighted"
    assert "matched: <strong>diffusion models</strong> in summary" in html
    assert "https://digest.example.org/manage/TOKEN" in html
    assert "<img" not in html and "http://" not in html.replace("http://www.w3.org", "")


def test_hostile_title_is_escaped() -> None:
    renderer = Renderer(_settings())
    text, html = renderer.bodies(_digest('<script>alert(1)</script><img src=x onerror="y">'))
    assert "<script>" not in html and "<img src=x" not in html
    assert "&lt;script&gt;" in html
    assert "<script>alert(1)</script>" in text, "the text part shows the title as text"


def test_operator_templates_override_one_file(tmp_path: Path) -> None:
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "digest_subject.txt").write_text(
        "Lab digest\r\nBcc: evil@example.org ({{ count }})", encoding="utf-8"
    )
    renderer = Renderer(_settings(templates_dir=str(tmp_path)))
    digest = _digest("A title")
    assert renderer.subject(digest) == "Lab digest Bcc: evil@example.org (1)", (
        "line breaks from a template never reach a header"
    )
    assert "A title" in renderer.bodies(digest)[1], "other templates are the built-in ones"


def test_shorten_cuts_long_summaries() -> None:
    short, cut = shorten("word " * 50)
    assert not cut and short == " ".join(["word"] * 50)
    text = "First sentence is here. " * 40
    short, cut = shorten(text, 200)
    assert cut and len(short) <= 200 and short.endswith(".")
    short, cut = shorten("x" * 10 + " " + "y" * 500, 100)
    assert cut and short.endswith("…")
