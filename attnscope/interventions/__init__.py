"""Attention interventions that reduce VLM hallucination, measured in the same run.

    from attnscope.interventions import VisualBoost
    trace = analyze_image(lm, "photo.jpg", "Describe the image.", generate=32,
                          intervention=VisualBoost(alpha=0.7, beta=0.3))

Score edits (``VisualBoost``, ``SinkSuppression``) run through the probe's attention function and
are undone on exit; ``carve`` masks the image itself and asks again.
"""

from attnscope.interventions.base import EditRecord, EditSession, ScoreEdit
from attnscope.interventions.boost import VisualBoost, select_tokens
from attnscope.interventions.carve import GENERAL_INSTRUCTION, CarveResult, carve
from attnscope.interventions.sinks import SinkSuppression, detect_sinks

__all__ = [
    "GENERAL_INSTRUCTION",
    "CarveResult",
    "EditRecord",
    "EditSession",
    "ScoreEdit",
    "SinkSuppression",
    "VisualBoost",
    "carve",
    "detect_sinks",
    "select_tokens",
]
