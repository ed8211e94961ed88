"""``report.html`` of a corpus run: per-head statistics over all of its prompts (computed by DuckDB
from the Parquet files, nothing loaded whole) and the list of prompts."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pyarrow as pa
import torch

from attnscope import metrics
from attnscope.atomic import write_file_atomically
from attnscope.errors import AttnscopeError
from attnscope.report import head_label, html_page, layer_head_panels
from attnscope.runfiles import CORPUS_FILE
from attnscope.store.runs import RunStore, sql_string
from attnscope.trace import TRACE_FILE

# panel title -> SQL aggregate over one head's rows of every prompt, and the column it needs
SPAN_PANEL = "head span (mean look-back distance)"
SINK_PANEL = f"share of prompts with sink score of token 0 > {metrics.SINK_EPS}"
HEAD_AGGREGATES = {
    SPAN_PANEL: ("avg(mean_distance)", "mean_distance"),
    "mean entropy": ("avg(entropy)", "entropy"),
    SINK_PANEL: (
        f"avg(CASE WHEN position = 0 THEN CAST(sink_score > {metrics.SINK_EPS} AS DOUBLE) END)",
        "sink_score",
    ),
}
EXCERPT = 120  # characters of each generated text shown in the prompt table


def corpus_head_stats(root: str | Path, name: str) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Layers and, per panel of ``HEAD_AGGREGATES`` the run can serve, values ``[L, H]`` over
    all prompts of corpus run ``name`` under ``root`` (token-weighted means)."""
    store = RunStore(root, timeout=None)  # the report aggregates every prompt of the corpus
    columns = set(store.sql("SELECT * FROM stats LIMIT 0").column_names)
    served = {title: agg for title, (agg, col) in HEAD_AGGREGATES.items() if col in columns}
    if not served:
        raise AttnscopeError(f"corpus run {name!r} has none of the columns a head map needs")
    select = ", ".join(f"{agg} AS c{i}" for i, agg in enumerate(served.values()))
    table: pa.Table = store.sql(
        f"SELECT layer, head, {select} FROM stats WHERE run = {sql_string(name)} "
        "GROUP BY layer, head ORDER BY layer, head"
    )
    if table.num_rows == 0:
        raise AttnscopeError(f"corpus run {name!r} holds no finished prompt yet")
    layer_ids = table["layer"].to_pylist()
    layers = sorted(set(layer_ids))
    rows = torch.tensor([layers.index(li) for li in layer_ids])
    heads = torch.tensor(table["head"].to_pylist())
    values = {}
    for i, title in enumerate(served):
        grid = torch.full((len(layers), int(heads.max()) + 1), float("nan"))
        grid[rows, heads] = torch.tensor(table[f"c{i}"].to_pylist(), dtype=torch.float32)
        values[title] = grid
    return layers, values


def write_corpus_report(out: str | Path) -> Path:
    """Write ``out/report.html`` for the corpus run in ``out`` and return its path."""
    out = Path(out).resolve()
    manifest = json.loads((out / CORPUS_FILE).read_text())
    layers, panels = corpus_head_stats(out.parent, out.name)
    span, sink_share = (panels.get(title) for title in (SPAN_PANEL, SINK_PANEL))
    n_heads = next(iter(panels.values())).shape[1]
    tags = {
        **(metrics.head_groups(span) if span is not None else {}),
        "sink": sink_share > 0.5
        if sink_share is not None
        else torch.zeros(len(layers), n_heads) > 0,
    }
    labels = [[head_label(tags, li, h) for h in range(n_heads)] for li in range(len(layers))]
    figure = layer_head_panels(panels, layers, labels, "Heads over all prompts")
    summary = (
        f"<h1>attnscope corpus run: {html.escape(out.name)}</h1>"
        f"<p>model {html.escape(str(manifest.get('model')))}; parameters "
        f"{html.escape(json.dumps(manifest.get('parameters')))}.</p>"
        + _prompt_table(out, manifest)
        + "<p>Head maps: means over every token of every stored prompt; hover marks local / "
        f"global heads (bottom / top {metrics.HEAD_GROUP_FRACTION:.0%} by head span) and sink "
        "heads (a sink in most prompts).</p>"
    )
    path = out / "report.html"
    write_file_atomically(path, html_page(summary, [figure], f"attnscope corpus {out.name}"))
    return path


def _prompt_table(out: Path, manifest: dict) -> str:
    """HTML table of the prompts: id, tokens and the start of the response, or the error."""
    failed = manifest.get("failed", {})
    rows, stored = [], 0
    for pid in manifest.get("prompts", []):
        header_file = out / "prompts" / pid / TRACE_FILE
        if header_file.is_file():
            header = json.loads(header_file.read_text())
            text = header.get("meta", {}).get("generated_text", "")
            cells = (pid, str(len(header["tokens"])), text[:EXCERPT])
            stored += 1
        else:
            cells = (pid, "-", f"not stored: {failed.get(pid, 'not analysed yet')}")
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return (
        f"<h3>Prompts: {stored} of {len(rows)} stored, {len(failed)} failed</h3>"
        "<table border='1' style='border-collapse:collapse'><tr><th>id</th><th>tokens</th>"
        f"<th>response (start)</th></tr>{''.join(rows)}</table>"
    )
