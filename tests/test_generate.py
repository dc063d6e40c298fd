"""Budget forcing: the cap forces </think> exactly at the budget and counts only rows it really forced."""

import torch

from posttrain.generate import ThinkCap


def test_think_cap_forces_at_budget_and_counts_only_real_forcing():
    end, vocab, plen = 5, 8, 3
    cap = ThinkCap(end, [2, 2, None, 0], plen, "cpu")
    ids = torch.zeros(4, plen + 2, dtype=torch.long)  # two tokens generated, none of them </think>
    scores = torch.zeros(4, vocab)
    scores[0, 1] = 3.0  # row 0 wants token 1: must be forced
    scores[1, end] = 3.0  # row 1 wants </think> anyway: closes by itself
    scores[2, 1] = 3.0  # row 2 has no cap
    out = cap(ids, scores.clone())
    assert out[0].argmax() == end and out[0, 1] == float("-inf")
    assert out[1].argmax() == end
    assert out[2].argmax() == 1  # budget 0 rows are pre-closed by the prompt: never forced
    assert cap.forced.tolist() == [True, False, False, False]
    # one step earlier nothing is forced
    early = ThinkCap(end, [2, 2, None, 0], plen, "cpu")
    assert torch.equal(early(ids[:, : plen + 1], scores.clone()), scores) and not early.forced.any()
