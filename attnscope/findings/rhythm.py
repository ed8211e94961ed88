"""Preplan-and-anchor rhythm (Li et al. 2025, "Attention Illuminates LLM Reasoning: The
Preplan-and-Anchor Rhythm Enables Fine-Grained Policy Optimization", Table 2) on greedy answers to
arithmetic word problems: the reproduction of the paper's measurements.

Signals come from the detection in ``attnscope.rhythm``: the local-head mean WAAD and the
global-head mean FAI over the response, on layers sampled from the middle third. Two measurements:

(a) token entropy at WAAD peaks vs at random response positions: the entropy (nats) of the
    next-token distribution each response token was chosen from, from one teacher-forced forward
    over prompt + response (greedy decoding: the same distributions as during generation);
(b) the share of FAI peaks that have a WAAD peak at most ``k`` tokens before them or at them,
    against the same share with the WAAD peaks moved to random positions of their response.

A *peak* is a local maximum above the response's 80th percentile (``peaks``). ``table2`` sets the
measurements beside the paper's Table 2 figures (``PUBLISHED_TABLE2``). With ``chat=True`` the
problems (default: ``two_step_problems``) are asked as user turns under the model's chat template,
so an instruct model writes its own reasoning trace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import plotly.graph_objects as go
import torch
from torch import Tensor
from tqdm.auto import tqdm

from attnscope.analyze import analyze
from attnscope.errors import AttnscopeError
from attnscope.findings.problems import two_step_problems
from attnscope.findings.table import Row
from attnscope.findings.texts import WordProblem, word_problems
from attnscope.models.loaded import LoadedModel
from attnscope.rhythm import RhythmConfig, rhythm, sample_layers

PEAK_QUANTILE = 0.8
LOOKBACK = 3  # an FAI peak at t counts as coupled when a WAAD peak lies in [t - k, t]
METRICS = ("waad", "mean_distance", "entropy", "fai")  # what rhythm() reads
MIN_RESPONSE = 16  # shorter responses (early end of text) are skipped and counted
# Li et al. 2025, Table 2 (Qwen3-4B-Base, GSM8K, 70 problems), as printed:
# statistic -> (name, random, observed, lift)
PUBLISHED_TABLE2 = {
    "entropy": ("(a) token entropy at WAAD peaks", 0.2386, 0.3608, "+51.97%"),
    "receiver": ("receiver-head / global FAI peak co-occurrence", 0.2241, 0.6084, "+171.49%"),
    "coupling": ("(b) FAI peak follows or coincides with a WAAD peak", 0.3687, 0.5253, "+42.47%"),
}


def peaks(x: Tensor, quantile: float = PEAK_QUANTILE) -> Tensor:
    """Local maxima above the ``quantile`` of the finite values of ``x`` ``[n]``: ``x[t] >
    x[t-1]`` and ``x[t] >= x[t+1]`` (a plateau counts once, at its first point; a missing or NaN
    neighbour counts as -inf) and ``x[t] > quantile``. NaN is never a peak. bool ``[n]``."""
    if x.ndim != 1:
        raise AttnscopeError(f"peaks() takes one signal [n], got shape {tuple(x.shape)}")
    finite = ~x.isnan()
    if not finite.any():
        return torch.zeros_like(finite)
    v = torch.where(finite, x.double(), float("-inf"))
    edge = v.new_full((1,), float("-inf"))
    left, right = torch.cat([edge, v[:-1]]), torch.cat([v[1:], edge])
    threshold = torch.quantile(x[finite].double(), quantile)
    return finite & (v > left) & (v >= right) & (v > threshold)


def coupled(anchor: Tensor, preplan: Tensor, k: int = LOOKBACK) -> Tensor:
    """Which ``anchor`` positions have a ``preplan`` position in ``[t - k, t]``.

    ``anchor`` bool ``[n]``; ``preplan`` bool ``[..., n]`` (leading dims: e.g. shuffles).
    Returns bool ``[..., n]``."""
    c = torch.nn.functional.pad(preplan.long().cumsum(-1), (1, 0))  # [..., n + 1]
    t = torch.arange(anchor.shape[-1])
    in_window = c[..., t + 1] - c[..., (t - k).clamp(min=0)]  # preplan count in [t - k, t]
    return anchor & (in_window > 0)


def random_like(mask: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` masks with as many True as ``mask`` ``[R]``, at uniformly random positions.
    bool ``[n, R]``."""
    order = torch.rand(n, mask.numel(), generator=generator).argsort(-1)
    return order < int(mask.sum())  # a uniformly random subset of the given size per row


@dataclass
class Comparison:
    """An observed pooled statistic against its value at random positions."""

    observed: float
    baseline: float  # mean over the random draws
    draws: Tensor  # [n] the statistic in each draw

    @property
    def p_value(self) -> float:
        """One-sided permutation p-value: share of draws at least as large as the observation."""
        return float((1 + (self.draws >= self.observed).sum()) / (1 + self.draws.numel()))

    @property
    def p_text(self) -> str:
        """``p = 0.012``, or ``p < 0.001`` below what three decimals show."""
        return "p < 0.001" if self.p_value < 0.001 else f"p = {self.p_value:.3f}"


def entropy_at_peaks(
    entropy: list[Tensor], peak: list[Tensor], n_shuffles: int, seed: int = 0
) -> Comparison:
    """Mean of ``entropy`` over the ``peak`` positions of all responses (pooled) against the same
    mean over random positions, as many per response as it has peaks."""
    g = torch.Generator().manual_seed(seed)
    total = sum(int(p.sum()) for p in peak)
    if total == 0:
        raise AttnscopeError("no peaks in any response: nothing to compare")
    observed = sum(float(h[p].sum()) for h, p in zip(entropy, peak, strict=True)) / total
    draws = sum(
        (random_like(p, n_shuffles, g).double() * h.double()).sum(-1)
        for h, p in zip(entropy, peak, strict=True)
    )
    return Comparison(observed, float(draws.mean() / total), draws / total)


def anchor_coupling(
    anchor: list[Tensor], preplan: list[Tensor], k: int, n_shuffles: int, seed: int = 0
) -> Comparison:
    """Share of all ``anchor`` peaks (pooled) with a ``preplan`` peak in ``[t - k, t]``, against the
    same share with each response's preplan peaks permuted to random positions of that response."""
    g = torch.Generator().manual_seed(seed)
    total = sum(int(a.sum()) for a in anchor)
    if total == 0:
        raise AttnscopeError("no anchor peaks in any response: nothing to compare")
    hits = sum(int(coupled(a, p, k).sum()) for a, p in zip(anchor, preplan, strict=True))
    draws = sum(
        coupled(a, random_like(p, n_shuffles, g), k).sum(-1).double()
        for a, p in zip(anchor, preplan, strict=True)
    )
    return Comparison(hits / total, float(draws.mean() / total), draws / total)


@torch.no_grad()
def token_entropy(lm: LoadedModel, token_ids: list[int], start: int) -> tuple[Tensor, Tensor]:
    """Entropy (nats) of the next-token distributions at positions ``start - 1 .. T - 1``
    ``[R + 1]`` (R = T - start): entry t is the distribution token ``start + t`` was chosen from,
    entry t + 1 the one computed at that token. Also whether each token ``start..T-1`` is the
    argmax of its distribution ``[R]`` (all True for a greedy generation, up to ties)."""
    if not 1 <= start < len(token_ids):
        raise AttnscopeError(f"start {start} must lie in 1..{len(token_ids) - 1}")
    ids = torch.tensor([token_ids], device=lm.model.device)
    n = len(token_ids) - start
    logits = lm.model(input_ids=ids, logits_to_keep=n + 1).logits[0].float()  # [R + 1, V]
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return entropy.cpu(), (logits[:-1].argmax(-1) == ids[0, start:]).cpu()


@dataclass
class RhythmSample:
    problem: WordProblem
    response: str
    waad: Tensor  # [R] local-head mean WAAD
    fai: Tensor  # [R] global-head mean FAI (NaN at the end: no rows in the horizon)
    entropy: Tensor  # [R] entropy of the distribution each token was chosen from
    entropy_next: Tensor  # [R] entropy of the distribution computed at each token (for the next)
    greedy: Tensor  # [R] bool: the token is that distribution's argmax
    waad_peaks: Tensor  # [R] bool
    fai_peaks: Tensor  # [R] bool


@dataclass
class RhythmResult:
    model: str
    samples: list[RhythmSample]
    chat: bool  # the problems were asked under the chat template
    layers: list[int]  # layers rhythm() read
    entropy: Comparison  # (a) at the distribution each peak token was drawn from
    entropy_next: Comparison  # (a') at the distribution the peak row computes
    coupling: Comparison  # (b)
    k: int
    quantile: float
    n_new: int
    skipped: int  # responses shorter than MIN_RESPONSE tokens, left out
    seconds: float

    @property
    def greedy_agreement(self) -> float:
        """Share of response tokens that are the argmax of the teacher-forced distribution."""
        return float(torch.cat([s.greedy for s in self.samples]).float().mean())

    def figure(self, index: int = 0) -> go.Figure:
        """One response: WAAD, FAI (scaled to WAAD's range) and token entropy, peaks marked."""
        s = self.samples[index]
        x = list(range(len(s.waad)))
        fai = s.fai / torch.nan_to_num(s.fai, nan=0.0).max().clamp_min(1e-9) * s.waad.max()
        fig = go.Figure()
        for name, y, peak in (
            ("WAAD (local heads)", s.waad, s.waad_peaks),
            ("FAI (global heads, scaled)", fai, s.fai_peaks),
        ):
            fig.add_scatter(x=x, y=y.tolist(), name=name, mode="lines")
            idx = peak.nonzero().flatten().tolist()
            fig.add_scatter(
                x=idx, y=y[idx].tolist(), mode="markers", name=f"{name.split()[0]} peaks"
            )
        fig.add_scatter(
            x=x,
            y=s.entropy.tolist(),
            name="token entropy (nats)",
            yaxis="y2",
            mode="lines",
            line_dash="dot",
        )
        fig.update_layout(
            title=f"Response {index}: {s.problem.question[:60]}...",
            xaxis_title="response token",
            yaxis_title="WAAD / scaled FAI",
            yaxis2=dict(title="entropy (nats)", overlaying="y", side="right"),
        )
        return fig

    @property
    def problems_text(self) -> str:
        if self.chat:
            return "two-step word problems asked under the chat template"
        return "templated word problems"

    def table2(self) -> str:
        """Markdown: the paper's Table 2 figures (random, observed, lift as printed) beside ours
        (lift = (observed - random) / random)."""
        ours = {"entropy": self.entropy, "coupling": self.coupling}
        lines = [
            "| statistic | paper: random | paper: observed | paper: lift | ours: random | "
            "ours: observed | ours: lift | ours: p |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for key, (name, p_random, p_observed, p_lift) in PUBLISHED_TABLE2.items():
            paper = f"{_fmt(key, p_random)} | {_fmt(key, p_observed)} | {p_lift}"
            c = ours.get(key)
            mine = (
                f"{_fmt(key, c.baseline)} | {_fmt(key, c.observed)} | "
                f"{_lift(c.baseline, c.observed)} | {c.p_text}"
                if c is not None
                else "not measured | | |"
            )
            lines.append(f"| {name} | {paper} | {mine} |")
        return "\n".join(lines)

    def verdict(self, alpha: float = 0.05) -> str:
        def part(name: str, c: Comparison) -> str:
            if c.observed <= c.baseline:
                return f"{name} disagrees (not higher than at random positions)"
            if c.p_value < alpha:
                return f"{name} agrees (higher than at random positions, {c.p_text})"
            return f"{name} inconclusive (higher, but {c.p_text}, not below {alpha})"

        return (
            f"{part('(a) entropy of the tokens at WAAD peaks', self.entropy)}; "
            f"{part('(a) entropy of the distribution computed at WAAD peaks', self.entropy_next)}; "
            f"{part('(b) FAI peaks after WAAD peaks', self.coupling)}"
        )

    def row(self) -> Row:
        e, nxt, c = self.entropy, self.entropy_next, self.coupling
        n_peaks = sum(int(s.waad_peaks.sum()) for s in self.samples)
        n_anchor = sum(int(s.fai_peaks.sum()) for s in self.samples)
        return Row(
            finding="Preplan-and-anchor rhythm (Li et al. 2025, Table 2)",
            published="WAAD peaks (preplan tokens) are high-entropy positions compared with random "
            "ones, and FAI peaks (anchors) follow or coincide with them (abstract: the "
            "introductory token 'is immediately followed by or coincides with' the anchor); "
            "Qwen reasoning traces. Table 2's numbers were not re-checked offline",
            measured=f"(a) token entropy {e.observed:.2f} nats at {n_peaks} WAAD peaks vs "
            f"{e.baseline:.2f} at random positions ({e.p_text}); of the distribution "
            f"computed at the peak: {nxt.observed:.2f} vs {nxt.baseline:.2f} ("
            f"{nxt.p_text}). (b) {100 * c.observed:.0f}% of {n_anchor} FAI peaks have a WAAD "
            f"peak within {self.k} tokens before or at them vs {100 * c.baseline:.0f}% with the "
            f"WAAD peaks shuffled ({c.p_text})",
            how=f"{self.model}, {len(self.samples)} {self.problems_text} ({self.skipped} left "
            f"out: answer under {MIN_RESPONSE} tokens), greedy up to {self.n_new} new tokens; "
            f"attnscope.rhythm: local-head WAAD, global-head FAI over response rows, layers "
            f"{self.layers}; peak = local maximum above the response's {self.quantile:.0%} "
            "quantile; token entropy = entropy of the next-token distribution the token was "
            "drawn from, one teacher-forced forward (greedy argmax reproduces "
            f"{100 * self.greedy_agreement:.1f}% of the tokens); random / shuffled = as many "
            f"positions per response, uniform, {e.draws.numel()} draws; one-sided permutation p",
        )


def _fmt(key: str, value: float) -> str:
    return f"{value:.4f} nats" if key == "entropy" else f"{100 * value:.2f}%"


def _lift(random: float, observed: float) -> str:
    return f"{100 * (observed - random) / random:+.2f}%" if random else "n/a"


def measure_rhythm(
    lm: LoadedModel,
    n_samples: int = 32,
    generate: int = 64,
    *,
    chat: bool = False,
    problems: list[WordProblem] | None = None,
    k: int = LOOKBACK,
    quantile: float = PEAK_QUANTILE,
    n_shuffles: int = 2000,
    config: RhythmConfig | None = None,
    seed: int = 0,
    progress: bool = True,
) -> RhythmResult:
    """Generate greedily for ``n_samples`` word problems and compare the rhythm's peaks.

    ``problems``: default ``word_problems`` in their question / answer frame, or with ``chat``
    ``two_step_problems`` asked as user turns under the chat template. The two halves,
    ``rhythm_samples`` and ``compare_samples``, let a caller spread the problems over processes.
    """
    start = time.perf_counter()
    if problems is None:
        problems = (two_step_problems if chat else word_problems)(n_samples, seed)
    samples, layers, skipped = rhythm_samples(
        lm, problems, generate, chat=chat, quantile=quantile, config=config, progress=progress
    )
    return compare_samples(
        lm.name,
        samples,
        layers,
        skipped,
        chat=chat,
        n_new=generate,
        k=k,
        quantile=quantile,
        n_shuffles=n_shuffles,
        seed=seed,
        seconds=time.perf_counter() - start,
    )


def rhythm_samples(
    lm: LoadedModel,
    problems: list[WordProblem],
    generate: int,
    *,
    chat: bool = False,
    quantile: float = PEAK_QUANTILE,
    config: RhythmConfig | None = None,
    progress: bool = True,
) -> tuple[list[RhythmSample], list[int], int]:
    """The greedy answer to each problem with its rhythm signals, entropies and peaks; the layers
    read; how many answers were too short (under ``MIN_RESPONSE`` tokens) and left out."""
    if lm.kind != "causal-lm":
        raise AttnscopeError(f"the rhythm needs a causal LM; {lm.name!r} is a {lm.kind} model")
    config = config or RhythmConfig()
    depth = lm.model.config.get_text_config().num_hidden_layers
    samples, layers, skipped = [], [], 0
    for problem in tqdm(problems, desc="rhythm", unit="problem", disable=not progress):
        trace = analyze(
            lm,
            problem.question if chat else problem.prompt,
            generate,
            chat=chat,
            metrics=METRICS,
            fai_rows="response",
            layers=tuple(sample_layers(depth, config.n_layers)),  # the layers rhythm() reads
            keep_qk=False,
            progress=False,
        )
        r0, r1 = trace.spans.get("response", (0, 0))
        if r1 - r0 < MIN_RESPONSE:  # stopped (end of text) almost at once: no rhythm to read
            skipped += 1
            continue
        r = rhythm(trace, config)
        entropy, greedy = token_entropy(lm, trace.token_ids, r0)  # [R + 1], [R]
        samples.append(
            RhythmSample(
                problem=problem,
                response=trace.meta["generated_text"],
                waad=r.waad,
                fai=r.fai,
                entropy=entropy[:-1],
                entropy_next=entropy[1:],
                greedy=greedy,
                waad_peaks=peaks(r.waad, quantile),
                fai_peaks=peaks(r.fai, quantile),
            )
        )
        layers = r.layers
    return samples, layers, skipped


def compare_samples(
    model: str,
    samples: list[RhythmSample],
    layers: list[int],
    skipped: int,
    *,
    chat: bool,
    n_new: int,
    k: int = LOOKBACK,
    quantile: float = PEAK_QUANTILE,
    n_shuffles: int = 2000,
    seed: int = 0,
    seconds: float = 0.0,
) -> RhythmResult:
    """(a) and (b) over the pooled ``samples`` of ``rhythm_samples``."""
    if not samples:
        raise AttnscopeError(
            f"all {skipped} responses ended within {MIN_RESPONSE} tokens: no rhythm to compare"
        )
    waad_peaks = [s.waad_peaks for s in samples]
    return RhythmResult(
        model=model,
        samples=samples,
        chat=chat,
        layers=layers,
        entropy=entropy_at_peaks([s.entropy for s in samples], waad_peaks, n_shuffles, seed),
        entropy_next=entropy_at_peaks(
            [s.entropy_next for s in samples], waad_peaks, n_shuffles, seed
        ),
        coupling=anchor_coupling([s.fai_peaks for s in samples], waad_peaks, k, n_shuffles, seed),
        k=k,
        quantile=quantile,
        n_new=n_new,
        skipped=skipped,
        seconds=seconds,
    )
