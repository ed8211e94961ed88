"""Every notebook in notebooks/ executes top to bottom without errors or warning spam, and its
HTML export (nbconvert, no kernel) holds every figure it drew."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbconvert import HTMLExporter
from traitlets.config import Config

# progress bars print one line per update; merging streams keeps the last state of each bar
EXPORT = Config({"CoalesceStreamsPreprocessor": {"enabled": True}})
NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
PLOTLY_MIME = "application/vnd.plotly.v1+json"
IMAGE_MIMES = ("image/png", "image/jpeg", "image/svg+xml")


def figure_outputs(nb) -> tuple[int, int]:
    """(plotly figures, images) among the notebook's outputs."""
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    data = [o.get("data", {}) for o in outputs]
    figures = sum(PLOTLY_MIME in d for d in data)
    images = sum(any(m in d for m in IMAGE_MIMES) and PLOTLY_MIME not in d for d in data)
    return figures, images


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_and_exports(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    streams = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "IProgress not found" not in streams and "TqdmWarning" not in streams

    page, _ = HTMLExporter(config=EXPORT).from_notebook_node(nb)
    figures, images = figure_outputs(nb)
    # every plotly figure is an HTML div drawn by plotly.js embedded in the page
    assert len(re.findall(r'class="plotly-graph-div"', page)) == figures
    if figures:
        assert "Plotly.newPlot" in page and page.count("plotly.js v") >= 1
    assert page.count("data:image/png;base64") + page.count("<svg") >= images
