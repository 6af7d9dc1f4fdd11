"""Dialog content as text and as safe HTML: nbformat outputs as text, markdown (markdown-it-py, then nh3) and
ANSI-coloured text (ansi2html)."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import nh3
from ansi2html import Ansi2HTMLConverter
from fastcore.ansi import strip_ansi as _strip_ansi
from markdown_it import MarkdownIt

# Image outputs shown as images (the page, the markdown export) and sent as images (the model context): the raster
# types every browser shows in an <img> and Anthropic's API takes. SVG is markup: each place treats it as such.
IMAGE_MIMES = ("image/png", "image/jpeg", "image/gif", "image/webp")


def text_of(value: Any) -> str:
    """nbformat's multiline string (a str or a list of lines) as one str."""
    if isinstance(value, list):
        return "".join(str(v) for v in value)
    return value if isinstance(value, str) else ("" if value is None else str(value))


def stream_text(outputs: list[dict], name: str) -> str:
    """One stream ("stdout" or "stderr") of stored nbformat outputs (a fresh run has kernels' ExecResult.stdout)."""
    return "".join(text_of(o.get("text")) for o in outputs
                   if o.get("output_type") == "stream" and o.get("name") == name)


def trim_middle(text: str, limit: int, *, head_thirds: int = 2, fit: bool = False,
                marker: str = "\n... [{} characters omitted] ...\n") -> str:
    """The head and the tail of `text` with `marker` (filled with the number of characters cut) between, once it is
    longer than `limit`; `head_thirds` thirds of what is kept come from the head. Without `fit` the marker comes
    on top of the limit, and a limit of 0 or less keeps everything. With `fit` the marker counts against the limit,
    each side is cut at a line break when that costs less than half of it, and a limit of 0 keeps nothing."""
    if len(text) <= limit or (limit <= 0 and not fit):
        return text
    if limit <= 0:
        return ""
    room = limit - len(marker.format(len(text))) if fit else limit
    if room <= 0:
        return text[-limit:]
    n_head = room * head_thirds // 3
    head, tail = text[:n_head], text[len(text) - (room - n_head):]
    if fit:
        nl = head.rfind("\n")
        if nl > len(head) // 2:
            head = head[:nl]
        nl = tail.find("\n")
        if 0 <= nl < len(tail) // 2:
            tail = tail[nl + 1:]
    return head + marker.format(len(text) - len(head) - len(tail)) + tail


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
_DATA_IMAGE = re.compile(rf"^data:({'|'.join(map(re.escape, IMAGE_MIMES))});base64,", re.I)


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
