"""The allowlist sanitizer: what hostile feed HTML turns into before it can reach an email."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from newsletter.sanitize import clean_html, html_to_text, safe_link

HOSTILE = """
<p onclick="steal()">Intro <b onmouseover="x()">bold</b> <em>em</em></p>
<script>alert('script text')</script>
<style>p { color: red }</style>
<img src="https://tracker.example/pixel.gif?u=42" width="1" height="1">
<img src=x onerror="alert('img')">
<iframe src="https://evil.example/">iframe text</iframe>
<form action="https://evil.example/login"><input name="pw"><button>Log in</button></form>
<a href="javascript:alert(1)">js link</a>
<a href=" JaVaScRiPt:alert(2)">js link 2</a>
<a href="java&#09;script:alert(3)">js link 3</a>
<a href="data:text/html;base64,PHNjcmlwdD4=">data link</a>
<a href="vbscript:msgbox(1)">vb link</a>
<a href="https://ok.example/paper?id=1&amp;v=2" target="_blank" rel="opener">good link</a>
<a href="mailto:author@example.org">mail</a>
<svg><script>alert('svg')</script></svg>
<object data="evil.swf">object text</object>
<!-- a comment -->
<p style="background:url(javascript:alert(4))">styled</p>
"""


def test_hostile_markup_is_reduced_to_the_allowlist() -> None:
    out = clean_html(HOSTILE)
    lowered = out.lower()
    for forbidden in (
        "<script", "alert", "<style", "color: red", "<img", "tracker", "<iframe", "iframe text",
        "<form", "<input", "log in", "javascript", "data:", "vbscript", "onclick", "onerror",
        "onmouseover", "<svg", "<object", "object text", "comment", "style=", "target=",
        "opener\"",
    ):  # fmt: skip
        assert forbidden not in lowered, forbidden
    assert "<p>Intro <b>bold</b> <em>em</em></p>" in out
    assert (
        '<a href="https://ok.example/paper?id=1&amp;v=2" rel="noopener noreferrer nofollow">'
        "good link</a>" in out
    )
    assert '<a href="mailto:author@example.org" rel="noopener noreferrer nofollow">mail</a>' in out
    # The text of a neutralized link stays readable; only the href goes.
    assert '<a rel="noopener noreferrer nofollow">js link</a>' in out


def test_allowed_formatting_survives() -> None:
    src = (
        "<p>a<br>b</p><ul><li>one</li></ul><ol><li>two</li></ol><blockquote>q</blockquote>"
        "<pre><code>x = 1</code></pre><p>H<sub>2</sub>O, x<sup>2</sup>, <i>i</i>, "
        "<strong>s</strong></p>"
    )
    assert clean_html(src) == src


def test_unknown_block_elements_become_paragraphs_so_words_do_not_merge() -> None:
    assert clean_html("<div>one</div><div>two</div><h2>three</h2>") == (
        "<p>one</p><p>two</p><p>three</p>"
    )
    assert html_to_text("<div>one</div><div>two</div><table><tr><td>3</td><td>4</td></tr>") == (
        "one two 3 4"
    )


def test_relative_links_need_a_base() -> None:
    src = '<a href="/paper/1">p</a> <a href="#frag">f</a>'
    assert "href" not in clean_html(src)
    out = clean_html(src, base_url="https://example.org/list/")
    assert 'href="https://example.org/paper/1"' in out
    # A base with a dangerous scheme is ignored rather than used for rewriting.
    assert "javascript" not in clean_html(src, base_url="javascript:alert(1)//")


def test_maths_with_less_than_is_not_eaten_as_a_tag() -> None:
    src = "We prove $x<y$ and $a<b$ whenever n<k, and <b>bold</b> still works."
    assert html_to_text(src) == "We prove $x<y$ and $a<b$ whenever n<k, and bold still works."
    assert "$x&lt;y$" in clean_html(src)
    assert "<b>bold</b>" in clean_html(src)


@pytest.mark.parametrize(
    ("html", "text"),
    [
        ("<p>Schr&ouml;dinger &amp; Bridge&nbsp;&#8212; x</p>", "Schrödinger & Bridge — x"),
        ("  several \n\t spaces  ", "several spaces"),
        ("<p>para one</p><p>para two</p>", "para one para two"),
        ("line<br>break", "line break"),
        ("Schr<i>ö</i>dinger", "Schrödinger"),
        ("<script>alert('x')</script><style>p{}</style>visible", "visible"),
        ("&lt;b&gt;literal&lt;/b&gt;", "<b>literal</b>"),
        ('<a href="https://x.org/?a=1&amp;b=">link</a> text', "link text"),
        ("", ""),
    ],
)
def test_html_to_text(html: str, text: str) -> None:
    assert html_to_text(html) == text


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://example.org/a?b=1#c", "https://example.org/a?b=1#c"),
        ("  http://example.org/  ", "http://example.org/"),
        ("HTTPS://EXAMPLE.ORG/x", "HTTPS://EXAMPLE.ORG/x"),
        ("https://example.org/a b", "https://example.org/a%20b"),
        ("javascript:alert(1)", None),
        ("JavaScript:alert(1)", None),
        ("data:text/html,hi", None),
        ("mailto:a@example.org", None),
        ("ftp://example.org/x", None),
        ("/relative/path", None),
        ("//example.org/protocol-relative", None),
        ("http://", None),
        ("http://[::1", None),
        ("https://example.org/\nx", None),
        ("", None),
        (None, None),
        ("https://example.org/" + "a" * 5000, None),
    ],
)
def test_safe_link(url: str | None, expected: str | None) -> None:
    assert safe_link(url) == expected


_PIECES = st.sampled_from(
    [
        "<script>", "</script>", "<a href='", "javascript:", "'>", "<img src=x onerror=",
        "alert(1)", "<p", ">", "<", "&", "&lt;", "\"", "'", " on", "load=", "<iframe>",
        "<style>", "data:", "<svg/onload=x>", "<!--", "-->", "text", "<b>", "</", "x<y",
    ]
)  # fmt: skip
_ALLOWED = {"p", "br", "a", "em", "strong", "i", "b", "code", "pre", "ul", "ol", "li"}
_ALLOWED |= {"blockquote", "sub", "sup"}
_TAG = re.compile(r"<(/?)([^\s/>]*)([^>]*)>")
_SAFE_ATTRS = re.compile(
    r'(?:\s(?:href="(?:https?|mailto):[^"]*"|rel="noopener noreferrer nofollow"))*'
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=30).map("".join))
def test_no_combination_of_hostile_pieces_gets_through(src: str) -> None:
    out = clean_html(src)
    # Text never contains a raw "<", so every "<" left in the output opens a real tag.
    assert out.count("<") == len(_TAG.findall(out)), out
    for _slash, name, attrs in _TAG.findall(out):
        assert name in _ALLOWED, out
        assert _SAFE_ATTRS.fullmatch(attrs), out
    text = html_to_text(src)
    assert "\n" not in text and "  " not in text and text == text.strip()
