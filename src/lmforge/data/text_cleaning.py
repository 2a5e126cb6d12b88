"""Unicode normalisation and HTML stripping, the first steps of `lmforge data clean`.

NFKC, not NFC: besides composing accents (what NFC does) it folds compatibility forms (full-width letters, ligatures
such as "ﬁ", non-breaking and other odd spaces) into their plain equivalents, so text scraped from different sources
spells the same words the same way, and the deduplication and quality rules that follow see them as equal.

HTML goes through the standard library's forgiving `html.parser` (it never raises on broken markup): text is kept,
tags are dropped, the contents of script/style/head-like elements are dropped, block elements end a line and
character references (`&amp;`, `&#8217;`) are decoded.
"""

from __future__ import annotations

import re
import unicodedata
from html.parser import HTMLParser

UNICODE_FORM = "NFKC"
# A tag, a comment or a doctype (`a < b` in prose is not): documents without one skip the parser.
_LOOKS_LIKE_HTML = re.compile(
    r"<(?:[a-zA-Z][a-zA-Z0-9-]*(?:\s[^<>]*)?/?|/[a-zA-Z][a-zA-Z0-9-]*\s*|!--.*?--|!doctype[^<>]*)>",
    re.IGNORECASE | re.DOTALL)
_INVISIBLE = {"script", "style", "noscript", "template", "head", "title", "svg", "iframe"}
_BLOCK = {"address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "figcaption", "figure", "footer",
          "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav", "ol", "p", "pre", "section",
          "table", "td", "th", "tr", "ul"}
_SPACES_BEFORE_NEWLINE = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize_unicode(text: str) -> str:
    """`text` in Unicode normal form NFKC."""
    return unicodedata.normalize(UNICODE_FORM, text)


def looks_like_html(text: str) -> bool:
    return _LOOKS_LIKE_HTML.search(text) is not None


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0  # depth inside elements whose text is not page text

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in _INVISIBLE:
            self.hidden += 1
        elif tag in _BLOCK:
            self.parts.append("\n")

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        if tag in _BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _INVISIBLE:
            self.hidden = max(0, self.hidden - 1)
        elif tag in _BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)


def strip_html(text: str) -> str:
    """The visible text of `text` when it holds HTML markup (else `text` unchanged)."""
    if not looks_like_html(text):
        return text
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    out = _SPACES_BEFORE_NEWLINE.sub("\n", "".join(parser.parts))
    return _BLANK_RUNS.sub("\n\n", out).strip()
