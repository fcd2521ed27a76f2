"""User-controlled text (layer names, file names, model specs, messages that echo them) made inert
before Streamlit renders it as Markdown.

`st.markdown`, `st.caption`, `st.info`/`st.error`/…, `st.toast`, `st.progress(text=)` and widget
labels all read Markdown (and Streamlit's extras: `:red[…]`, `:material/…:`, `$…$`). A layer named
`![x](http://host/x)` would otherwise make every browser that views the page fetch that address.
`escape` backslash-escapes every character Markdown or those extras give a meaning to, and puts the
text on one line (trimmed); `code` shows text in a code span when it can be one.
"""

from __future__ import annotations

import re

# CommonMark lets any ASCII punctuation be backslash-escaped; these are the ones that start or end
# markup (links, images, emphasis, code, HTML, autolinks, tables, headings, lists) or Streamlit's
# colour / icon / emoji / LaTeX syntax.
_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~$:=^&\"'/@%])")
_BREAKS = re.compile(r"\s*[\r\n]+\s*")


def escape(text: object) -> str:
    """`text` as literal Markdown: shown exactly as written, never a link, image, HTML or style."""
    # Stripped too: leading spaces would start an indented code block.
    return _SPECIAL.sub(r"\\\1", _BREAKS.sub(" ", str(text)).strip())


def code(text: object) -> str:
    """`text` in a code span (shown verbatim), or escaped when it holds a backtick or a line break."""
    value = str(text)
    if "`" in value or "\n" in value or "\r" in value:
        return escape(value)
    return f"`{value}`"
