"""CHAIR on a hand-made caption set gives the hand-computed values."""

import pytest

from attnscope.errors import AttnscopeError
from attnscope.metrics.hallucination import chair, singular

CAPTIONS = [
    "A man walks his puppy past a bench.",  # person, dog, bench*
    "Two kittens sleep on a sofa next to a cat.",  # cat, couch*, cat
    "Cars wait at a traffic light near a hot dog stand.",  # car, traffic light, hot dog*
    "A woman and her children eat pizza.",  # person, person, pizza
]
OBJECTS = [["dog", "person"], ["cat"], ["car", "traffic light", "bus"], ["person", "pizza", "cup"]]


def test_chair_by_hand():
    result = chair(CAPTIONS, OBJECTS)
    by_caption = [(c.mentioned, c.hallucinated) for c in result.captions]
    assert by_caption == [
        (("person", "dog", "bench"), ("bench",)),
        (("cat", "couch", "cat"), ("couch",)),
        (("car", "traffic light", "hot dog"), ("hot dog",)),  # a hot dog is not a dog
        (("person", "person", "pizza"), ()),
    ]
    assert result.chair_s == pytest.approx(3 / 4)
    assert result.chair_i == pytest.approx(3 / 12)  # 3 hallucinated of 12 mentions
    assert result.recall == pytest.approx((2 + 1 + 2 + 2) / (2 + 1 + 3 + 3))
    assert result.captions[2].covered == {"car", "traffic light"}


def test_synonym_table_can_be_extended():
    captions = ["A kite and a surfboard above the beach."]
    assert chair(captions, [["kite"]]).captions[0].mentioned == ()
    result = chair(captions, [["kite"]], synonyms={"kite": ("kites",), "surfboard": ("board",)})
    assert result.captions[0].mentioned == ("kite", "surfboard")
    assert result.captions[0].hallucinated == ("surfboard",)
    assert (result.chair_s, result.chair_i, result.recall) == (1.0, 0.5, 1.0)
    # ground-truth names go through the synonyms too
    assert chair(["A puppy."], [["puppies"]]).chair_i == 0.0


def test_singular_forms():
    words = "horses buses glasses benches puppies people knives dogs bus grass"
    assert [singular(w) for w in words.split()] == [
        "horse",
        "bus",
        "glass",
        "bench",
        "puppy",
        "person",
        "knife",
        "dog",
        "bus",
        "grass",
    ]


def test_errors():
    with pytest.raises(AttnscopeError, match="2 captions but 1"):
        chair(["a", "b"], [["dog"]])
    with pytest.raises(AttnscopeError, match="at least one caption"):
        chair([], [])
