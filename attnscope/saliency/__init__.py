"""Captum attributions on the same inputs as the captured attention (speech features for now),
compared with attention in ``attnscope.metrics.alignment``."""

from attnscope.saliency.forward import TeacherForced
from attnscope.saliency.speech import METHODS, Saliency, SaliencyCost, method_name, speech_saliency

__all__ = ["METHODS", "Saliency", "SaliencyCost", "TeacherForced", "method_name", "speech_saliency"]
