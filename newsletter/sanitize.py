"""Make untrusted feed HTML safe to put in an email, and turn it into plain text.

Feeds are written by strangers, so everything that reaches a digest goes through an allowlist
(nh3, i.e. the Rust `ammonia` sanitizer): only simple formatting and http(s)/mailto links
survive. Script/style/iframe/form content is dropped together with its text, and images are
dropped so no tracking pixel can report when a reader opens the email.
"""

from __future__ import annotations

import re
from functools import lru_cache
from html import unescape
from typing import Literal
from urllib.parse import urlsplit

import nh3

__all__ = ["clean_html", "html_to_text", "safe_link"]

ALLOWED_TAGS = frozenset(
    {
        "p", "br", "a", "em", "strong", "i", "b", "code", "pre",
        "ul", "ol", "li", "blockquote", "sub", "sup",
    }
)  # fmt: skip
LINK_SCHEMES = frozenset({"http", "https", "mailto"})
LINK_REL = "noopener noreferrer nofollow"

# Elements removed together with everything inside them: showing a script's source or a form's
# button labels as text would be noise at best and phishing bait at worst.
_DROP_WITH_CONTENT = frozenset(
    {
        "script", "style", "iframe", "frame", "frameset", "object", "embed", "applet",
        "form", "button", "select", "textarea", "noscript", "noembed", "noframes",
        "template", "svg", "canvas", "audio", "video", "title", "head",
    }
)  # fmt: skip

# Block elements outside the allowlist are renamed to <p>/<br> before sanitizing, so that
# "<div>a</div><div>b</div>" reads "a b" rather than "ab" once the tags are stripped.
_BLOCK_TO_P = frozenset(
    {
        "div", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "header", "footer",
        "aside", "nav", "main", "figure", "figcaption", "address", "details", "summary",
        "table", "caption", "tr", "td", "th", "dl", "dt", "dd", "center", "hgroup",
    }
)  # fmt: skip

# Every element name an HTML parser treats as a tag. A "<" followed by anything else is escaped
# first, because feed abstracts are full of maths such as "$x<y$" that an HTML parser would
# otherwise swallow as an unknown tag (losing the text up to the next ">").
_HTML_ELEMENTS = (
    ALLOWED_TAGS
    | _DROP_WITH_CONTENT
    | _BLOCK_TO_P
    | frozenset(nh3.ALLOWED_TAGS)
    | frozenset(
        {
            "html", "body", "meta", "link", "base", "img", "picture", "source", "track",
            "input", "label", "option", "optgroup", "fieldset", "legend", "output", "progress",
            "meter", "datalist", "font", "span", "big", "blink", "marquee", "math", "param",
            "dialog", "menu", "menuitem", "search", "slot", "xmp", "listing", "plaintext",
            "image", "isindex", "keygen", "nobr", "basefont", "bgsound", "spacer", "dir",
        }
    )
)  # fmt: skip

_TAG_START_RE = re.compile(r"<(/?)([A-Za-z][^\s/>]*)")
# Serialized ammonia output always double-quotes attributes and escapes '"' inside them.
_SANITIZED_TAG_RE = re.compile(r'<(/?)([a-z]+)(?:[^>"]|"[^"]*")*>')
_TEXT_BREAK_TAGS = frozenset({"p", "br", "li", "ul", "ol", "pre", "blockquote"})
_CONTROL_CHARS_RE = re.compile(r"[\x00-\x1f\x7f]")

MAX_URL_LENGTH = 2048  # the width of entries.link


def _cleaner(
    url_relative: Literal["deny"] | tuple[Literal["rewrite_with_base"], str],
) -> nh3.Cleaner:
    return nh3.Cleaner(
        tags=set(ALLOWED_TAGS),
        clean_content_tags=set(_DROP_WITH_CONTENT),
        attributes={"a": {"href"}},
        url_schemes=set(LINK_SCHEMES),
        link_rel=LINK_REL,
        strip_comments=True,
        url_relative=url_relative,
    )


# Without a base there is nothing to resolve a relative link against, and "/x" in an email
# points nowhere useful, so such links lose their href.
_CLEANER = _cleaner("deny")


@lru_cache(maxsize=256)
def _cleaner_for_base(base_url: str) -> nh3.Cleaner:
    # One feed shares one base, so caching keeps the per-entry cost at a dict lookup.
    return _cleaner(("rewrite_with_base", base_url))


def _fix_tag_start(match: re.Match[str]) -> str:
    slash, name = match.group(1), match.group(2)
    lowered = name.lower()
    if lowered in _BLOCK_TO_P:
        return f"<{slash}p"
    if lowered == "hr":
        return "<br"
    if lowered in _HTML_ELEMENTS or "-" in name or ":" in name:
        return match.group(0)
    return f"&lt;{slash}{name}"


def _prepare(markup: str) -> str:
    if "<" not in markup:
        return markup
    return _TAG_START_RE.sub(_fix_tag_start, markup)


def clean_html(html: str, *, base_url: str | None = None) -> str:
    """Reduce untrusted HTML to the small allowlist an email digest can show safely.

    `base_url` (optional, an extension of the documented interface) resolves relative links;
    without it relative links lose their href. A base that is not an absolute http(s) URL is
    ignored so it cannot smuggle in a dangerous scheme.
    """
    if not html:
        return ""
    base = safe_link(base_url)
    cleaner = _cleaner_for_base(base) if base else _CLEANER
    return cleaner.clean(_prepare(html)).strip()


def _break_or_drop(match: re.Match[str]) -> str:
    return " " if match.group(2) in _TEXT_BREAK_TAGS else ""


def sanitized_to_text(sanitized: str) -> str:
    """Plain text from the output of `clean_html`, skipping a second HTML parse.

    Only valid for `clean_html` output: it relies on the serializer's normalized tags.
    """
    if "<" in sanitized:
        sanitized = _SANITIZED_TAG_RE.sub(_break_or_drop, sanitized)
    if "&" in sanitized:
        sanitized = unescape(sanitized)
    return " ".join(sanitized.split())


def html_to_text(html: str) -> str:
    """Plain text from untrusted HTML: tags gone, entities decoded, whitespace collapsed."""
    if "<" not in html and "&" not in html:
        return " ".join(html.split())
    return sanitized_to_text(clean_html(html))


def safe_link(url: str | None) -> str | None:
    """Return `url` only if it is an absolute http(s) URL, so links in emails can't run code."""
    if not url:
        return None
    url = url.strip()
    if not url or len(url) > MAX_URL_LENGTH:
        return None
    url = url.replace(" ", "%20")
    if _CONTROL_CHARS_RE.search(url):
        return None
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:  # e.g. a malformed IPv6 literal
        return None
    if parts.scheme.lower() not in ("http", "https") or not hostname:
        return None
    return url
