"""Generation helpers: left padding and its positions, cutting at EOS, EOS / pad fallbacks."""

from types import SimpleNamespace

import torch

from attnscope.generation import cut_at_eos, eos_ids, left_pad, pad_token_id, padded_positions


def tokenizer(pad=None, eos=None):
    return SimpleNamespace(pad_token_id=pad, eos_token_id=eos)


def model(eos=None):
    return SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos))


def test_left_pad_and_positions():
    t = torch.tensor
    ids, mask = left_pad([t([1, 2, 3]), t([4]), t([5, 6])], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4], [9, 5, 6]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long
    assert padded_positions(mask).tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]


def test_cut_at_eos():
    t = torch.tensor([5, 6, 2, 7, 2])
    assert cut_at_eos(t, [2]).tolist() == [5, 6, 2]
    assert cut_at_eos(t, {9, 6}).tolist() == [5, 6]  # any collection, the first hit
    assert cut_at_eos(t, [9]).tolist() == t.tolist()
    assert cut_at_eos(t, []).tolist() == t.tolist()  # no EOS: nothing to cut
    assert cut_at_eos(torch.tensor([2, 2]), {2}).tolist() == [2]


def test_eos_ids_fallbacks():
    assert eos_ids(model(eos=[3, 4]), tokenizer(eos=7)) == [3, 4]  # generation config first
    assert eos_ids(model(eos=3), tokenizer(eos=7)) == [3]
    assert eos_ids(model(), tokenizer(eos=7)) == [7]  # generation config without EOS
    assert eos_ids(None, tokenizer(eos=7)) == [7]
    assert eos_ids(model(), tokenizer()) == []


def test_pad_token_id_fallbacks():
    assert pad_token_id(model(eos=3), tokenizer(pad=0, eos=7)) == 0  # tokenizer's pad first
    assert pad_token_id(model(eos=[3, 4]), tokenizer(eos=7)) == 3  # tokenizer without pad
    assert pad_token_id(model(), tokenizer(eos=7)) == 7
    assert pad_token_id(None, tokenizer(eos=7)) == 7
    assert pad_token_id(model(), tokenizer()) == 0  # nothing at all: padding is masked anyway
