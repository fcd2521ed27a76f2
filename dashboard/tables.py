"""Tables sized to their content: every column at least as wide as its header and its longest value.

Streamlit gives each column a width from its first rows and clips headers ("top…") and the last
column of a wide table. `fit` returns the `column_config` with a pixel width per column computed
from the header and the values as shown; a table wider than its container then scrolls sideways
instead of cutting columns. No Streamlit calls here: plain dicts, the shape `st.column_config.*`
returns.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

CHAR_PX = 8  # an average character of the table font, with room for bold headers
PADDING_PX = 28  # cell padding, plus the sort arrow a header shows
MIN_PX, MAX_PX = 56, 420
_SAMPLE_ROWS = 500


def _shown(value: Any, number_format: str | None) -> str:
    """The text a cell shows, near enough to size its column."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        if number_format and number_format.startswith("%"):
            try:
                return number_format % value
            except (TypeError, ValueError):
                pass
        if number_format == "percent":
            return f"{100 * value:.2f}%"
        return f"{value:.4g}"
    if isinstance(value, int) and number_format in ("localized", "compact"):
        return f"{value:,}"
    return str(value)


def column_width(label: str, values: pd.Series, number_format: str | None = None) -> int:
    """Pixels for a column headed `label` holding `values` (its first rows)."""
    longest = max([len(label), *(len(_shown(v, number_format)) for v in values.head(_SAMPLE_ROWS))])
    return max(MIN_PX, min(MAX_PX, CHAR_PX * longest + PADDING_PX))


def fit(frame: pd.DataFrame, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """`config` (a dataframe's column_config) with a width for every column of `frame` that has none."""
    out = dict(config or {})
    for column in frame.columns:
        entry = out.get(column)
        entry = {"label": entry} if isinstance(entry, str) else dict(entry or {})
        if entry.get("width") is None:
            label = entry.get("label") or str(column)
            number_format = (entry.get("type_config") or {}).get("format")
            entry["width"] = column_width(label, frame[column], number_format)
        out[column] = entry
    return out
