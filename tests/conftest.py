"""Test environment: offline hub, Triton interpreter, no silent torchvision installs.

These variables must be set before anything imports triton or transformers, hence module level.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


def _no_torchvision_install(*args, **kwargs) -> bool:
    """Stand-in for TransformerLens's helper that would `pip install torchvision` (ENVIRONMENT.md)."""
    return False


try:  # TransformerLens 4 silently runs `pip install torchvision` for some multimodal directories.
    from transformer_lens.model_bridge.sources.transformers import helpers as _tl_helpers

    _tl_helpers._ensure_torchvision = _no_torchvision_install
except ImportError:
    pass


def pytest_collection_modifyitems(config, items):
    """``cuda`` tests run only on a CUDA GPU with real kernels (``TRITON_INTERPRET=0``, as
    benchmarks/gpu_check.py sets it); elsewhere they are skipped."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and TRITON_INTERPRET=0")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A fresh model cache (ATTNSCOPE_CACHE) for one test module: tiny models are built there."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("cache")
    mp.setenv("ATTNSCOPE_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture
def one_thread():
    """One torch thread: tiny models gain nothing from threads, on a busy 2-core machine threads
    crawl, and forked writers start without a thread pool."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
