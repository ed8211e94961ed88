"""Export a view: the data behind a figure as a long table (CSV / Parquet), the figure as PNG."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import plotly.graph_objects as go
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from attnscope.errors import AttnscopeError

FORMATS = ("csv", "parquet", "png")


def figure_table(fig: dict[str, Any]) -> pa.Table:
    """One row per plotted value of a figure (as the browser holds it): the trace (``panel``),
    ``x``, ``y``, ``value`` (heatmaps: z; bars and lines: y) and the hover ``text``."""
    columns: dict[str, list] = {"panel": [], "x": [], "y": [], "value": [], "text": []}

    def add(panel: str, x: Any, y: Any, value: float, text: Any) -> None:
        for key, v in zip(columns, (panel, str(x), str(y), value, str(text or "")), strict=True):
            columns[key].append(v)

    for i, trace in enumerate(go.Figure(fig).data):
        name = str(trace.name or f"trace {i}")
        if trace.type == "heatmap":
            z = _array(trace.z).astype(float)
            x = range(z.shape[1]) if trace.x is None else list(_array(trace.x))
            y = range(z.shape[0]) if trace.y is None else list(_array(trace.y))
            for r, c in np.ndindex(z.shape):
                text = trace.text[r][c] if trace.text is not None else None
                add(name, x[c], y[r], float(z[r, c]), text)
        elif trace.type in ("bar", "scatter") and trace.y is not None:
            ys = list(_array(trace.y))
            x = range(len(ys)) if trace.x is None else list(_array(trace.x))
            for j, (xv, yv) in enumerate(zip(x, ys, strict=True)):
                if xv is None or yv is None or isinstance(yv, str):
                    continue  # line breaks and text labels
                text = trace.text[j] if isinstance(trace.text, (list, tuple)) else None
                add(name, xv, yv, float(yv), text)
    if not columns["panel"]:
        raise AttnscopeError("this view shows no data to export")
    return pa.table(columns)


def _array(value: Any) -> np.ndarray:
    """A figure array as numpy, plotly's typed-array JSON (``{"dtype", "bdata", "shape"}``)
    included."""
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        shape = [int(n) for n in str(value.get("shape", len(flat))).split(",")]
        return flat.reshape(shape)
    return np.asarray(value, dtype=object if _ragged(value) else None)


def _ragged(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and any(v is None for v in value)


def export_bytes(fig: dict[str, Any], fmt: str) -> bytes:
    """The figure's data as CSV or Parquet, or the figure as PNG (kaleido with Chromium)."""
    if fmt == "png":
        figure = go.Figure(fig)
        height = figure.layout.height or 500
        width = figure.layout.width or 1300
        return figure.to_image(format="png", width=width, height=height)
    table = figure_table(fig)
    sink = io.BytesIO()
    if fmt == "csv":
        pacsv.write_csv(table, sink)
    elif fmt == "parquet":
        pq.write_table(table, sink)
    else:
        raise AttnscopeError(f"unknown export format {fmt!r}; use one of {FORMATS}")
    return sink.getvalue()
