"""Figures and progress bars that work in notebooks, live and exported.

``setup()`` once at the top of a notebook:

- plotly figures go out as the plotly mimetype (JupyterLab, VS Code) *and* as HTML, with plotly.js
  embedded once in the notebook, so ``jupyter nbconvert --to html`` and any HTML viewer show them
  without a kernel or a network;
- tqdm's "IProgress not found" warning is silenced: without ipywidgets, ``tqdm.auto`` falls back
  to text bars, which Jupyter draws in place.
"""

from __future__ import annotations

import warnings

import plotly.io as pio

RENDERER = "plotly_mimetype+notebook"


def setup(renderer: str = RENDERER) -> None:
    """Make plotly figures render live and in exported HTML (``renderer``), and keep progress bars
    free of the ipywidgets warning."""
    warnings.filterwarnings("ignore", message="IProgress not found")
    pio.renderers.default = renderer
