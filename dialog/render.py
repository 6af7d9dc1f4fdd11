"""Safe HTML from dialog content: markdown (markdown-it-py, then nh3) and ANSI-coloured text (ansi2html)."""

from __future__ import annotations

import re
from functools import lru_cache

import nh3
from ansi2html import Ansi2HTMLConverter
from fastcore.ansi import strip_ansi as _strip_ansi
from markdown_it import MarkdownIt

# The markdown renderer may pass raw HTML through; nh3 then decides what survives, so a model or a
# notebook that writes <script>, onerror= or javascript: links produces inert text.
_md = MarkdownIt("commonmark", {"html": True, "linkify": False}).enable("table").enable("strikethrough")
_ALLOWED_TAGS = {
    "a", "abbr", "b", "blockquote", "br", "code", "del", "details", "div", "em", "h1", "h2", "h3", "h4",
    "h5", "h6", "hr", "i", "img", "kbd", "li", "ol", "p", "pre", "s", "span", "strong", "sub", "summary",
    "sup", "table", "tbody", "td", "th", "thead", "tr", "ul",
}
_ALLOWED_ATTRS = {
    "a": {"href", "title"},
    "img": {"src", "alt", "title", "width", "height"},
    "code": {"class"},
    "td": {"align"},
    "th": {"align"},
    "ol": {"start"},
}
_URL_SCHEMES = {"http", "https", "mailto", "data"}
_DATA_IMAGE = re.compile(r"^data:image/(png|jpeg|gif|webp);base64,", re.I)


def _filter_attr(tag: str, attr: str, value: str) -> str | None:
    # data: URLs are fine as images, never as links (a data:text/html link is a script vector).
    if attr in ("href", "src") and value.strip().lower().startswith("data:"):
        return value if tag == "img" and _DATA_IMAGE.match(value.strip()) else None
    if tag == "code" and attr == "class":
        return value if re.fullmatch(r"language-[\w+-]{1,30}", value) else None
    return value


def sanitize_html(html: str) -> str:
    return nh3.clean(html, tags=_ALLOWED_TAGS, attributes=_ALLOWED_ATTRS, url_schemes=_URL_SCHEMES,
                     attribute_filter=_filter_attr, link_rel="noopener noreferrer nofollow")


def markdown_html(text: str) -> str:
    """Markdown to HTML that is safe to put in the page."""
    return sanitize_html(_md.render(text or ""))


@lru_cache(maxsize=1)
def _converter() -> Ansi2HTMLConverter:
    # Classes, not inline styles: the page's Content-Security-Policy allows no inline style.
    return Ansi2HTMLConverter(inline=False, dark_bg=False, line_wrap=True)


def ansi_html(text: str) -> str:
    """Terminal text with ANSI colours as escaped HTML with classes (see ansi_css)."""
    return _converter().convert(text or "", full=False, ensure_trailing_newline=False)


def ansi_css() -> str:
    css = _converter().produce_headers()
    return re.sub(r"</?style[^>]*>", "", css)


def strip_ansi(text: str) -> str:
    """Remove ANSI escape sequences (CSI, OSC and two-byte escapes)."""
    return _strip_ansi(text or "")
