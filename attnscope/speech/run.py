"""A speech run directory: the token trace (RunStore sees it), encoder statistics, transcript,
alignment and deletion tables, word timings, maps, figures and a static ``report.html``.

```
runs/NAME/
  trace.json, stats.parquet      cross-attention statistics per output token
  encoder/                        encoder self-attention statistics (a Trace, frames as tokens)
  speech.json                     transcript, tokens, words (word, start, end), meta, saliency info
  alignment.parquet               method, scope, layer, head, pearson, spearman, topk_overlap
  deletion.parquet                ranking, fraction, log_prob, auc
  maps.safetensors                cross_attention [L,H,T,F], features [M,n], saliency.* [T,M,n],
                                  pooled.* [T,F]
  figures/*.json                  plotly figures (plotly.io.read_json)
  report.html
```
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import plotly.graph_objects as go
import pyarrow.parquet as pq
from safetensors.torch import save_file

from attnscope.report import head_maps, html_page
from attnscope.speech.analysis import SpeechAnalysis
from attnscope.speech.plots import alignment_figure, deletion_figure, token_figure, token_frame_maps


def write_speech_run(
    analysis: SpeechAnalysis, out: str | Path, *, token: int | None = None, overwrite: bool = False
) -> Path:
    """Write the run into ``out`` in one atomic write (``Trace.save``: an existing attnscope run
    is replaced only if ``overwrite``); ``token`` is the one plotted over the spectrogram
    (default: the spoken token with the most saliency mass). Returns the report's path."""
    token = _default_token(analysis) if token is None else token
    figures = {
        f"token_{token % len(analysis.tokens)}": token_figure(analysis, token),
        "tokens_x_frames": token_frame_maps(analysis),
        "alignment": alignment_figure(analysis),
        "deletion": deletion_figure(analysis),
        "encoder_heads": head_maps(analysis.cross.encoder).update_layout(
            title=f"Encoder self-attention heads (all {analysis.meta['frames_in_window']} frames,"
            " padding included)"
        ),
    }

    def fill(tmp: Path) -> None:  # beside the token trace's files
        analysis.cross.encoder.save(tmp / "encoder")
        (tmp / "speech.json").write_text(json.dumps(_summary(analysis), indent=1))
        pq.write_table(analysis.alignment, tmp / "alignment.parquet")
        pq.write_table(analysis.deletion, tmp / "deletion.parquet")
        save_file(_tensors(analysis), tmp / "maps.safetensors")
        (tmp / "figures").mkdir()
        for name, fig in figures.items():
            fig.write_json(tmp / "figures" / f"{name}.json")
        (tmp / "report.html").write_text(_report(analysis, figures))

    return analysis.cross.trace.save(out, overwrite=overwrite, extra=fill) / "report.html"


def _default_token(analysis: SpeechAnalysis) -> int:
    spoken = [i for i, t in enumerate(analysis.tokens) if any(c.isalnum() for c in t)]
    if not analysis.pooled or not spoken:
        return 0
    mass = next(iter(analysis.pooled.values())).sum(-1)
    return max(spoken, key=lambda i: float(mass[i]))


def _summary(analysis: SpeechAnalysis) -> dict:
    return {
        "model": analysis.model,
        "transcript": analysis.transcript,
        "tokens": analysis.tokens,
        "token_ids": analysis.cross.token_ids,
        "words": [[w.word, round(w.start, 3), round(w.end, 3)] for w in analysis.words],
        "meta": analysis.meta,
        "saliency": {
            m: {
                "params": s.params,
                "seconds": round(s.seconds, 3),
                "convergence_delta": None
                if s.convergence_delta is None
                else s.convergence_delta.tolist(),
                "completeness_error": None
                if s.completeness_error is None
                else s.completeness_error.tolist(),
            }
            for m, s in analysis.saliency.items()
        },
    }


def _tensors(analysis: SpeechAnalysis) -> dict:
    speech = analysis.speech
    tensors = {
        "cross_attention": analysis.cross.maps,
        "features": speech.features[0, :, : speech.n_mel_audio].cpu(),
    }
    for m, s in analysis.saliency.items():
        tensors[f"saliency.{m}"] = s.values
        tensors[f"pooled.{m}"] = analysis.pooled[m]
    return {k: v.contiguous().float() for k, v in tensors.items()}


def alignment_text(analysis: SpeechAnalysis) -> str:
    """The layer and model rows of the alignment table as aligned text."""
    lines = [f"{'method':<22} {'scope':<10} {'pearson':>8} {'spearman':>9} {'top-k':>6}"]
    for r in analysis.alignment.to_pylist():
        if r["scope"] == "head":
            continue
        scope = f"layer {r['layer']}" if r["scope"] == "layer" else "all heads"
        lines.append(
            f"{r['method']:<22} {scope:<10} {r['pearson']:>8.3f} {r['spearman']:>9.3f} "
            f"{r['topk_overlap']:>6.3f}"
        )
    return "\n".join(lines)


def saliency_text(analysis: SpeechAnalysis) -> str:
    """Cost of each saliency method and, for integrated gradients, its completeness error."""
    lines = []
    for m, s in analysis.saliency.items():
        line = f"{m}: {s.seconds:.1f} s"
        if s.completeness_error is not None:
            error = s.completeness_error
            line += (
                f", completeness error median {error.median():.1%}, max {error.max():.1%} "
                f"(token {analysis.tokens[int(error.argmax())]!r}; more n_steps lowers it)"
            )
        lines.append(line)
    return "\n".join(lines)


def words_text(analysis: SpeechAnalysis) -> str:
    return "\n".join(f"{w.start:7.2f} {w.end:7.2f}  {w.word}" for w in analysis.words)


def _report(analysis: SpeechAnalysis, figures: dict[str, go.Figure]) -> str:
    meta = analysis.meta
    summary = (
        f"<h1>attnscope speech run: {html.escape(analysis.model)}</h1>"
        f"<p>{meta['audio_seconds']:.2f} s of audio, {meta['audio_frames']} of "
        f"{meta['frames_in_window']} encoder frames; {html.escape(meta['frames'])}. Saliency pooled "
        f"to the frame rate with {html.escape(json.dumps(meta['pooling']))}; top-k overlap with "
        f"k = {meta['top_k']} (chance {meta['topk_chance']:.3f}).</p>"
        f"<h2>Transcript ({meta['mode']})</h2><p>{html.escape(analysis.transcript)}</p>"
        f"<h2>Alignment</h2><pre>{html.escape(alignment_text(analysis))}</pre>"
        f"<h2>Saliency</h2><pre>{html.escape(saliency_text(analysis))}</pre>"
        f"<h2>Word timings</h2><pre>{html.escape(words_text(analysis))}</pre>"
    )
    return html_page(summary, list(figures.values()), "attnscope speech report")
