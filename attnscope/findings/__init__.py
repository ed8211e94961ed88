"""Reproductions of published attention findings on the packaged models, from inputs the project
writes itself (English prose, word problems, synthesised speech): one table of
finding | published figure | attnscope on the packaged model | how measured.

```python
from attnscope.findings import measure_sinks, markdown
sinks = measure_sinks(asc.load("gemma3-270m"), n_samples=32)
print(markdown([sinks.row()]))
sinks.figure()
```
"""

from attnscope.findings.heads import HeadsResult, count_teeth, dominant_distance, measure_heads
from attnscope.findings.rhythm import (
    Comparison,
    RhythmResult,
    anchor_coupling,
    coupled,
    entropy_at_peaks,
    measure_rhythm,
    peaks,
    token_entropy,
)
from attnscope.findings.sinks import (
    SinkResult,
    alpha0,
    first_token_sink_scores,
    layer_sink_ratio,
    measure_sinks,
    sink_inputs,
    sink_ratio,
)
from attnscope.findings.speech import SpeechResult, measure_speech
from attnscope.findings.table import Row, markdown, to_arrow

__all__ = [
    "Comparison",
    "HeadsResult",
    "RhythmResult",
    "Row",
    "SinkResult",
    "SpeechResult",
    "alpha0",
    "anchor_coupling",
    "count_teeth",
    "coupled",
    "dominant_distance",
    "entropy_at_peaks",
    "first_token_sink_scores",
    "layer_sink_ratio",
    "markdown",
    "measure_heads",
    "measure_rhythm",
    "measure_sinks",
    "measure_speech",
    "peaks",
    "sink_inputs",
    "sink_ratio",
    "to_arrow",
    "token_entropy",
]
