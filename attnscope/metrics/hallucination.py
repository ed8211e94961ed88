"""CHAIR object hallucination metrics (Rohrbach et al., 2018) from captions and ground-truth objects.

An object is mentioned when a caption contains one of its words (synonym table, longest match
first, so "hot dog" is not a dog; plurals are reduced to singular first). Per caption, every
mention counts, as in the original CHAIR code:
- CHAIR_I = hallucinated mentions / all mentions, over all captions;
- CHAIR_S = captions with at least one hallucinated mention / captions;
- recall  = ground-truth objects mentioned / ground-truth objects (unique per caption).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from attnscope.errors import AttnscopeError

# Canonical object (a COCO category) -> the words that name it. Extend with chair(synonyms=...).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("person", "man", "woman", "boy", "girl", "child", "kid", "people", "player", "lady"),
    "bicycle": ("bicycle", "bike", "cycle"),
    "car": ("car", "automobile", "taxi", "sedan"),
    "motorcycle": ("motorcycle", "motorbike", "scooter"),
    "airplane": ("airplane", "plane", "jet", "aircraft"),
    "bus": ("bus",),
    "train": ("train", "locomotive"),
    "truck": ("truck", "pickup"),
    "boat": ("boat", "ship", "kayak", "canoe"),
    "traffic light": ("traffic light", "stoplight", "traffic signal"),
    "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",),
    "bench": ("bench",),
    "bird": ("bird", "duck", "pigeon", "seagull"),
    "cat": ("cat", "kitten", "kitty"),
    "dog": ("dog", "puppy", "pup"),
    "horse": ("horse", "pony"),
    "sheep": ("sheep", "lamb"),
    "cow": ("cow", "cattle", "calf"),
    "elephant": ("elephant",),
    "bear": ("bear",),
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "umbrella": ("umbrella",),
    "bottle": ("bottle",),
    "cup": ("cup", "mug"),
    "fork": ("fork",),
    "knife": ("knife",),
    "spoon": ("spoon",),
    "bowl": ("bowl",),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich",),
    "orange": ("orange",),
    "pizza": ("pizza",),
    "hot dog": ("hot dog",),
    "cake": ("cake", "cupcake"),
    "chair": ("chair", "stool"),
    "couch": ("couch", "sofa"),
    "bed": ("bed",),
    "dining table": ("dining table", "table"),
    "toilet": ("toilet",),
    "tv": ("tv", "television"),
    "laptop": ("laptop", "computer"),
    "cell phone": ("cell phone", "phone", "cellphone", "smartphone"),
    "book": ("book",),
    "clock": ("clock",),
    "vase": ("vase",),
    "teddy bear": ("teddy bear", "teddy"),
}

_IRREGULAR = {
    "men": "man",
    "women": "woman",
    "people": "person",
    "children": "child",
    "mice": "mouse",
    "geese": "goose",
    "teeth": "tooth",
    "feet": "foot",
    "knives": "knife",
    "calves": "calf",
    "buses": "bus",
}
_WORD = re.compile(r"[a-z]+")


def singular(word: str) -> str:
    """A rough English singular: irregular forms, -ies, -(ss|x|ch|sh)es, -s (not -ss, -us)."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us")) and len(word) > 3:
        return word[:-1]
    return word


def _words(text: str) -> tuple[str, ...]:
    return tuple(singular(w) for w in _WORD.findall(text.lower()))


@dataclass(frozen=True)
class CaptionObjects:
    mentioned: tuple[str, ...]  # canonical objects in order of mention (repeats kept)
    hallucinated: tuple[str, ...]  # mentions not in the ground truth
    covered: frozenset[str]  # ground-truth objects mentioned
    ground_truth: frozenset[str]


@dataclass(frozen=True)
class ChairResult:
    chair_s: float
    chair_i: float
    recall: float
    captions: tuple[CaptionObjects, ...]


class ObjectVocabulary:
    """Canonical objects and the phrases that name them (singularised words)."""

    def __init__(self, synonyms: Mapping[str, Iterable[str]]) -> None:
        self.phrases: dict[tuple[str, ...], str] = {}
        for canonical, names in synonyms.items():
            for name in (canonical, *names):
                self.phrases[_words(name)] = canonical
        self.longest = max(len(p) for p in self.phrases)

    def canonical(self, name: str) -> str:
        """The canonical object a ground-truth name refers to (itself when unknown)."""
        return self.phrases.get(_words(name), name.lower().strip())

    def mentions(self, caption: str) -> list[str]:
        """Canonical objects mentioned in ``caption``, longest phrases first, left to right."""
        words, found, i = _words(caption), [], 0
        while i < len(words):
            for n in range(min(self.longest, len(words) - i), 0, -1):
                canonical = self.phrases.get(words[i : i + n])
                if canonical is not None:
                    found.append(canonical)
                    i += n
                    break
            else:
                i += 1
        return found


def chair(
    captions: Sequence[str],
    objects: Sequence[Iterable[str]],
    synonyms: Mapping[str, Iterable[str]] | None = None,
) -> ChairResult:
    """CHAIR_S, CHAIR_I and recall of ``captions`` against ground-truth ``objects`` (one list of
    object names per caption). ``synonyms`` adds to (or overrides entries of) ``SYNONYMS``."""
    if len(captions) != len(objects):
        raise AttnscopeError(f"{len(captions)} captions but {len(objects)} ground-truth lists")
    if not captions:
        raise AttnscopeError("CHAIR needs at least one caption")
    vocab = ObjectVocabulary({**SYNONYMS, **(synonyms or {})})
    per_caption = []
    for caption, names in zip(captions, objects, strict=True):
        truth = frozenset(vocab.canonical(n) for n in names)
        mentioned = vocab.mentions(caption)
        per_caption.append(
            CaptionObjects(
                mentioned=tuple(mentioned),
                hallucinated=tuple(m for m in mentioned if m not in truth),
                covered=frozenset(mentioned) & truth,
                ground_truth=truth,
            )
        )
    n_mentions = sum(len(c.mentioned) for c in per_caption)
    n_truth = sum(len(c.ground_truth) for c in per_caption)
    return ChairResult(
        chair_s=sum(bool(c.hallucinated) for c in per_caption) / len(per_caption),
        chair_i=sum(len(c.hallucinated) for c in per_caption) / n_mentions if n_mentions else 0.0,
        recall=sum(len(c.covered) for c in per_caption) / n_truth if n_truth else float("nan"),
        captions=tuple(per_caption),
    )
