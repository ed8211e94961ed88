"""Speech models: cross-attention (output token x encoder frame) against saliency, word timings.

```python
from attnscope.speech import analyze_speech, load_audio, write_speech_run
analysis = analyze_speech(asc.load("whisper-tiny-en"), load_audio("clip.wav"))
analysis.alignment          # Pearson / Spearman / top-k per head, per layer, all heads
analysis.words              # [WordTiming(word, start, end)]
alignment_heads(lm, ["please open the window"]).table()   # heads ranked by word timing
write_speech_run(analysis, "runs/clip")
```
"""

from attnscope.speech.analysis import SpeechAnalysis, analyze_speech
from attnscope.speech.audio import SAMPLE_RATE, load_audio, speak
from attnscope.speech.cross import CrossAttention, capture_cross_attention
from attnscope.speech.heads import AlignmentHeads, alignment_heads, speak_words
from attnscope.speech.inputs import SpeechInput, prepare
from attnscope.speech.run import alignment_text, saliency_text, words_text, write_speech_run
from attnscope.speech.timing import WordTiming, word_timings

__all__ = [
    "SAMPLE_RATE",
    "AlignmentHeads",
    "CrossAttention",
    "SpeechAnalysis",
    "SpeechInput",
    "WordTiming",
    "alignment_heads",
    "alignment_text",
    "analyze_speech",
    "capture_cross_attention",
    "load_audio",
    "prepare",
    "saliency_text",
    "speak",
    "speak_words",
    "word_timings",
    "words_text",
    "write_speech_run",
]
