"""RolloutWorker: the decoding loop (`posttrain.decode.Decoder`) against HF `generate` and a teacher-forced forward
pass."""

import pytest
import torch

from posttrain.workers.rollout import RolloutWorker

PROMPTS = ["7+3*2-5", "12-4", "3*3*3+1-8*2"]  # different lengths: left padding matters


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    """The tiny random model with larger random weights: at its init (std 0.02) and with tied embeddings, greedy
    decoding just repeats the last prompt token, which would make the comparisons below vacuous."""
    torch.set_num_threads(1)
    w = RolloutWorker(tiny_model_dir, threads=1)
    g = torch.Generator().manual_seed(0)
    w.update_weights({k: torch.randn(v.shape, generator=g) * (1.0 if "norm" in k else 0.3)
                      for k, v in w.model.state_dict().items() if "norm" in k or "proj" in k})
    return w


def _hf_greedy(worker, prompts, budgets, max_new_tokens, eos_id):
    """Reference: HF generate, greedy, left padding; returns the completion ids (B, T) padded with pad id."""
    from posttrain.decode import render_prompts

    tok = worker.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(render_prompts(tok, prompts, budgets), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = side
    out = worker.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                top_p=None, top_k=None, eos_token_id=eos_id, pad_token_id=tok.pad_token_id)
    return out[:, enc["input_ids"].shape[1]:]


@pytest.mark.parametrize("group_size", [1, 3])
def test_greedy_matches_hf_generate(worker, group_size):
    ref = _hf_greedy(worker, PROMPTS, [None] * 3, 12, worker.eos_id)
    assert len(set(ref.flatten().tolist())) > 6  # not a degenerate repetition
    batch = worker.generate(PROMPTS, [None] * 3, group_size=group_size, max_new_tokens=12, greedy=True)
    assert batch.group_index == [i for i in range(3) for _ in range(group_size)]
    assert torch.equal(batch.response_ids, ref.repeat_interleave(group_size, 0))
    assert batch.response_mask.all() and not batch.forced_mask.any()


def test_rows_stop_individually_at_eos(worker, monkeypatch):
    """Pretend a token row 0 emits early is EOS: row 0 stops there, the others go on, as in HF generate."""
    free = worker.generate(PROMPTS, [None] * 3, group_size=1, max_new_tokens=10, greedy=True).response_ids
    others = set(free[1:].flatten().tolist())
    step = next(t for t in range(1, 8) if free[0, t].item() not in others and free[0, t] not in free[0, :t])
    fake_eos = free[0, step].item()
    monkeypatch.setattr(worker, "eos_id", fake_eos)
    batch = worker.generate(PROMPTS, [None] * 3, group_size=2, max_new_tokens=10, greedy=True)
    ref = _hf_greedy(worker, PROMPTS, [None] * 3, 10, fake_eos).repeat_interleave(2, 0)
    assert torch.equal(batch.response_ids, ref)
    assert batch.response_mask[:2].sum(1).tolist() == [step + 1] * 2  # EOS included
    assert (batch.response_ids[:2, step + 1:] == worker.pad_id).all()
    assert (batch.logp[:2, step + 1:] == 0).all()
    assert batch.response_mask[2:].all()


def _teacher_forced_logp(model, batch):
    ids = torch.cat([batch.prompt_ids, batch.response_ids], 1)
    mask = torch.cat([batch.prompt_mask, batch.response_mask], 1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    p = batch.prompt_ids.shape[1]
    lp = torch.log_softmax(logits[:, p - 1 : -1], -1)
    return lp.gather(2, batch.response_ids[..., None]).squeeze(2) * batch.response_mask


def test_logp_matches_teacher_forced_forward(worker):
    batch = worker.generate(PROMPTS, [None, 4, 0], group_size=4, max_new_tokens=40, temperature=0.7, top_p=0.9,
                            seed=3)
    ref = _teacher_forced_logp(worker.model, batch)
    assert batch.forced_mask.any()  # a forced token's logp is the policy's too
    assert (batch.response_mask.sum(1) < batch.response_ids.shape[1]).any()  # rows that stopped early, padded
    torch.testing.assert_close(batch.logp, ref, atol=1e-4, rtol=0)


def test_budget_forcing(worker, monkeypatch):
    from posttrain import decode

    end = worker.think_end_id
    sample = decode._sample

    def never_close(logits, *args):  # a model that would not close its think block by itself
        return sample(logits.masked_fill(torch.arange(logits.shape[1]) == end, float("-inf")), *args)

    monkeypatch.setattr(decode, "_sample", never_close)
    batch = worker.generate(PROMPTS, [3, 0, None], group_size=2, max_new_tokens=6, temperature=1.0, seed=1)
    for r in (0, 1):  # budget 3: </think> forced at thinking position 3
        assert batch.response_ids[r, 3] == end and not (batch.response_ids[r, :3] == end).any()
        assert batch.forced_mask[r].nonzero().flatten().tolist() == [3]
        assert batch.n_think[r] == 3 and batch.closed[r] and batch.forced[r]
        assert batch.texts[r].count("</think>") == 1
    for r in (2, 3):  # budget 0: pre-closed by the prompt, never forced
        assert not batch.forced_mask[r].any() and not batch.forced[r] and not (batch.response_ids[r] == end).any()
        assert batch.n_think[r] == 0 and batch.closed[r] and batch.texts[r].startswith("</think>\n\n")
    for r in (4, 5):  # no budget: never forced
        assert not batch.forced_mask[r].any() and not batch.closed[r] and batch.n_think[r] == 6
    assert torch.equal(batch.loss_mask, batch.response_mask * (~batch.forced_mask).long())
    monkeypatch.setattr(decode, "_sample", sample)

    # the model's own choice of </think> at the budget is not forcing: call the greedy 4th token "</think>"
    free = worker.generate(PROMPTS[:1], [3], group_size=1, max_new_tokens=3, greedy=True)  # stops before the cap
    ids = torch.cat([free.prompt_ids, free.response_ids], 1)
    with torch.no_grad():
        own = worker.model(input_ids=ids).logits[0, -1].argmax().item()
    assert own not in free.response_ids[0].tolist()
    monkeypatch.setattr(worker, "think_end_id", own)
    mine = worker.generate(PROMPTS[:1], [3], group_size=1, max_new_tokens=6, greedy=True)
    assert mine.response_ids[0, 3] == own and not mine.forced_mask.any() and not mine.forced[0]
    assert mine.closed[0] and mine.n_think[0] == 3


def test_temperature_zero_and_tiny_top_p_are_greedy(worker):
    greedy = worker.generate(PROMPTS, [None, 8, 0], group_size=2, max_new_tokens=8, greedy=True).response_ids
    assert torch.equal(worker.generate(PROMPTS, [None, 8, 0], 2, 8, temperature=0).response_ids, greedy)
    assert torch.equal(worker.generate(PROMPTS, [None, 8, 0], 2, 8, top_p=1e-6, seed=0).response_ids, greedy)


def test_sampling_is_seeded(worker):
    def run(seed):
        return worker.generate(PROMPTS, [None, 8, None], group_size=3, max_new_tokens=8, seed=seed).response_ids

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert a.shape != c.shape or not torch.equal(a, c)
    assert len({tuple(r) for r in a.tolist()}) > 1  # group members differ when sampling


def test_update_weights(tiny_model_dir):
    torch.set_num_threads(1)
    w = RolloutWorker(tiny_model_dir, threads=1)
    before = w.generate(PROMPTS, [None] * 3, group_size=1, max_new_tokens=6, greedy=True)
    name = "model.norm.weight"
    new = torch.randn_like(w.model.state_dict()[name]) * 3
    assert w.update_weights({name: new}) == 1
    assert torch.equal(w.model.state_dict()[name], new)
    after = w.generate(PROMPTS, [None] * 3, group_size=1, max_new_tokens=6, greedy=True)
    assert not torch.equal(before.response_ids, after.response_ids) or not torch.allclose(before.logp, after.logp)

    with pytest.raises(ValueError, match="model.norm.weigth"):
        w.update_weights([("model.norm.weigth", new)])
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*shape"):
        w.load_state_dict({name: new[:-1]})
    assert torch.equal(w.model.state_dict()[name], new)  # a rejected update leaves the model as it was
