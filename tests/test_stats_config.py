"""StatsConfig (one validated declaration of the statistics parameters) and backend choice."""

import dataclasses

import pytest
import torch

import attnscope as asc
from attnscope import kernels
from attnscope.errors import UnsupportedMetricError
from attnscope.kernels import backends
from attnscope.kernels.config import StatsConfig
from attnscope.kernels.request import build_request


# -- StatsConfig --------------------------------------------------------------------------------
def test_config_normalises_and_round_trips_through_json():
    config = StatsConfig(
        metrics=["entropy", "span_mass:q", "entropy"],
        layers=[3, 1, 3],
        fai_horizon=[2, 8],
        spans={"q": [0, 4]},
        keep_qk=[2],
    )
    assert config.metrics == ("entropy", "span_mass:q")
    assert config.layers == (1, 3) and config.keep_qk == (2,)
    assert config.fai_horizon == (2, 8) and config.span_dict == {"q": (0, 4)}
    assert StatsConfig.from_json(config.to_json()) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.window = 3  # type: ignore[misc]


def test_config_shortcuts_override_fields():
    base = StatsConfig(window=4, metrics=("waad",))
    assert StatsConfig.build(base, window=7) == StatsConfig(window=7, metrics=("waad",))
    assert StatsConfig.build(base, fai_horizon=None).fai_horizon is None  # None is a value
    assert StatsConfig.build(None) == StatsConfig()
    with pytest.raises(TypeError, match="unknown statistics parameter"):
        StatsConfig.build(base, windw=3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(window=0), ValueError, "window"),
        (dict(sink_tokens=-1), ValueError, "sink_tokens"),
        (dict(fai_horizon=(9, 3)), ValueError, "horizon"),
        (dict(fai_rows="prompt"), ValueError, "fai_rows"),
        (dict(fai_rows=(5, 2)), ValueError, "0 <= start <= end"),
        (dict(fai_rows=(-1, 2)), ValueError, "0 <= start <= end"),
        (dict(spans={"a": (4, 1)}), ValueError, "span 'a'"),
        (dict(metrics=["entropyy"]), UnsupportedMetricError, "unknown metric"),
        (dict(metrics="entropy"), UnsupportedMetricError, "list of names"),
        (dict(metrics=["span_mass:x"]), UnsupportedMetricError, "span_mass:NAME needs"),
        (dict(backend="cuda"), UnsupportedMetricError, "unknown backend"),
        (dict(layers=[0.5]), ValueError, "integer layer indices"),
        (dict(keep_qk="all"), ValueError, "keep_qk"),
    ],
)
def test_config_refuses_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        StatsConfig(**kwargs)


def test_attention_stats_takes_a_config_or_shortcuts():
    q, k = torch.randn(1, 2, 12, 8), torch.randn(1, 1, 12, 8)
    config = StatsConfig(metrics=("waad", "fai"), window=3, fai_horizon=(1, 4), backend="chunked")
    a = kernels.attention_stats(q, k, config)
    b = kernels.attention_stats(
        q, k, metrics=("waad", "fai"), window=3, fai_horizon=(1, 4), backend="chunked"
    )
    torch.testing.assert_close(a.rows["waad"], b.rows["waad"], rtol=0, atol=0)
    torch.testing.assert_close(a.cols["fai"], b.cols["fai"], rtol=0, atol=0, equal_nan=True)
    assert build_request(q, k, config).config == config
    with pytest.raises(ValueError, match="fai_rows='response' needs a generation"):
        kernels.attention_stats(q, k, fai_rows="response")


# -- backend choice --------------------------------------------------------------------------------
@pytest.fixture
def on_cuda(monkeypatch):
    """Make backend choice believe every tensor is on a CUDA device."""
    if "triton" not in backends.BACKENDS:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(backends, "device_type", lambda t: "cuda")


def _request(**kwargs):
    q, k = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    return build_request(q, k, **kwargs)


def test_auto_picks_triton_on_cuda_when_it_serves_everything(on_cuda):
    backend, reason = backends.choose(_request())
    assert backend.name == "triton" and reason.startswith("auto: triton")


def test_auto_on_the_cpu_picks_chunked():
    backend, reason = backends.choose(_request())
    assert backend.name == "chunked" and reason.startswith("auto: chunked")


@pytest.mark.parametrize(
    "kwargs, why",
    [
        (
            dict(
                mask=torch.zeros(1, 1, 6, 6).masked_fill(torch.ones(6, 6).triu(1).bool(), -1e9)
                + torch.eye(6)
            ),
            "score bias",
        ),
        (dict(spans={f"s{i}": (i % 6, i % 6 + 1) for i in range(16)}), "more than 15 spans"),
    ],
    ids=["score-bias", "16-spans"],
)
def test_auto_on_cuda_falls_back_to_chunked_and_says_why(on_cuda, kwargs, why):
    backend, reason = backends.choose(_request(**kwargs))
    assert backend.name == "chunked"
    assert why in reason
    with pytest.raises(UnsupportedMetricError, match=f"triton backend cannot serve.*{why}"):
        backends.choose(_request(**kwargs), "triton")


def test_float64_is_not_sent_to_triton(on_cuda):
    q = torch.randn(1, 2, 6, 16, dtype=torch.float64)
    backend, reason = backends.choose(build_request(q, q))
    assert backend.name == "chunked" and "dtype torch.float64" in reason


def test_capture_records_the_config_and_the_backend_choice(cache_dir):
    lm = asc.load("tiny-llama")
    ids = torch.randint(5, 200, (1, 10))
    config = StatsConfig(metrics=("entropy", "fai"), fai_horizon=(1, 3))
    with torch.no_grad(), asc.capture(lm.model, config=config) as cap:
        lm.model(input_ids=ids)
    meta = cap.trace.meta
    assert StatsConfig.from_json(meta["stats_config"]) == config
    assert meta["backend"] == "chunked" and meta["backend_reason"].startswith("auto: chunked")
    assert set(cap.trace.rows) == {"entropy"} and set(cap.trace.cols) == {"fai"}


def test_explicit_backend_that_cannot_serve_fails_clearly(cache_dir):
    lm = asc.load("tiny-llama")
    with pytest.raises(UnsupportedMetricError, match="unknown backend"):
        asc.capture(lm.model, backend="flash")
