"""Generative verifier (GenRM): the prompt format, its Yes/No training examples, P(Yes) scoring, and ROC AUC.

Direct GenRM of Zhang et al. 2024 ("Generative Verifiers: Reward Modeling as Next-Token Prediction"): the
verifier is a causal LM fine-tuned to answer ``Yes`` or ``No`` to

    Problem: {problem}
    Response: {response}
    Is the answer correct?

rendered as a user turn through the tokenizer's chat template with ``thinking_budget=0``, so the generation
prompt ends with an empty, closed think block and the very next token is the answer. The reward is P(Yes).

Differences from the paper:
- P(Yes) is the softmax over the two logits [Yes, No] only (``sigmoid(l_yes - l_no)``), not the full-vocabulary
  probability of ``Yes``. The two-way softmax always sums to one over the two answers the verifier was trained on,
  so the score is not deflated by probability mass on other tokens (an undertrained or off-format verifier), and
  it is exactly the probability the 0.5 accuracy threshold is meant for.
- No chain-of-thought verification (GenRM-CoT) and no majority voting over verification rationales: the
  embedded model is too small to write useful rationales.
- `response` is the raw completion text as `posttrain.generate` returns it (starting inside the think block, or
  with ``</think>`` for budget 0), so the verifier sees the reasoning as well as the answer.

The embedded tokenizer has ``Yes`` and ``No`` as single, distinct tokens (its training corpus contains them). For
another tokenizer where a word splits, the first token of each is used (see `answer_token_ids`).
"""

from __future__ import annotations

import logging
from typing import Sequence

YES, NO = "Yes", "No"
QUESTION = "Is the answer correct?"

logger = logging.getLogger("posttrain")


def verifier_prompt(problem: str, response: str) -> str:
    """The user message the verifier answers.

    >>> verifier_prompt("7+3", "7+3=10</think>\\n\\n10")
    'Problem: 7+3\\nResponse: 7+3=10</think>\\n\\n10\\nIs the answer correct?'
    """
    return f"Problem: {problem}\nResponse: {response}\n{QUESTION}"


def answer_token_ids(tokenizer) -> tuple[int, int]:
    """Ids of the ``Yes`` and ``No`` answer tokens (right after ``</think>\\n\\n``, so with no leading space).

    A word that splits into several tokens is represented by its first token (logged once); the two must differ.
    """
    ids = []
    for word in (YES, NO):
        toks = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            logger.warning("verifier: %r is %d tokens in this tokenizer; using its first token", word, len(toks))
        ids.append(toks[0])
    if ids[0] == ids[1]:
        raise ValueError(f"verifier: {YES!r} and {NO!r} start with the same token {ids[0]}; cannot tell them apart")
    return ids[0], ids[1]


def prompt_ids(tokenizer, problem: str, response: str) -> list[int]:
    """Chat-template ids of the verifier prompt, ending with the empty think block (thinking_budget=0)."""
    msgs = [{"role": "user", "content": verifier_prompt(problem, response)}]
    return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False,
                                              thinking_budget=0))


def tokenize_example(tokenizer, problem: str, response: str, correct: bool) -> dict:
    """A verifier training example: prompt ids + [Yes|No, EOS]; `completion_mask` is 1 on exactly those two."""
    yes_id, no_id = answer_token_ids(tokenizer)
    ids = prompt_ids(tokenizer, problem, response)
    answer = [yes_id if correct else no_id, tokenizer.eos_token_id]
    return {"input_ids": ids + answer, "completion_mask": [0] * len(ids) + [1] * len(answer)}


def score(model, tokenizer, problems: Sequence[str], responses: Sequence[str], batch_size: int = 32) -> list[float]:
    """P(Yes) per (problem, response): softmax over the [Yes, No] logits at the answer position.

    Batches are right-padded and the logits read at each row's last prompt token, so a row's score does not
    depend on what it was batched with (causal attention never sees the padding after it).
    """
    import torch

    yes_id, no_id = answer_token_ids(tokenizer)
    rows = [prompt_ids(tokenizer, p, r) for p, r in zip(problems, responses, strict=True)]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    out: list[float] = []
    with torch.no_grad():
        for lo in range(0, len(rows), batch_size):
            batch = rows[lo:lo + batch_size]
            lengths = torch.tensor([len(r) for r in batch], device=device)
            width = int(lengths.max())
            ids = torch.full((len(batch), width), pad, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(batch):
                ids[i, :len(r)] = torch.tensor(r, device=device)
                mask[i, :len(r)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            last = logits[torch.arange(len(batch), device=device), lengths - 1]  # (B, V)
            two = last[:, [yes_id, no_id]].float()  # (B, 2)
            out += torch.softmax(two, dim=-1)[:, 0].tolist()
    if was_training:
        model.train()
    return out


def roc_auc(scores: Sequence[float], labels: Sequence[bool | int]) -> float:
    """ROC AUC by the rank (Mann-Whitney U) formula with average ranks for ties:

        AUC = (sum of positive ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)

    i.e. P(score of a random positive > score of a random negative) + 0.5 P(tie). NaN when a class is empty.

    >>> roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    >>> roc_auc([0.5, 0.5], [0, 1])
    0.5
    """
    if len(scores) != len(labels):
        raise ValueError(f"roc_auc: {len(scores)} scores for {len(labels)} labels")
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # a run of tied scores shares the average of the ranks it spans (1-based)
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        avg = (i + j) / 2 + 1
        for k in range(i, j + 1):
            ranks[order[k]] = avg
        i = j + 1
    pos_rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    return (pos_rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def within_group_auc(scores: Sequence[float], labels: Sequence[bool | int], groups: Sequence) -> float:
    """AUC over (positive, negative) pairs from the same group only: the pair-weighted mean of per-group AUCs.

    With groups = problem difficulty this asks whether a verifier tells right from wrong *beyond* "longer problems
    fail more", which a plain AUC rewards. NaN when no group holds both classes.

    >>> within_group_auc([0.9, 0.1, 0.2, 0.8], [1, 0, 1, 0], ["a", "a", "b", "b"])
    0.5
    """
    by_group: dict = {}
    for s, y, g in zip(scores, labels, groups, strict=True):
        by_group.setdefault(g, ([], []))[0 if y else 1].append(s)
    total = weight = 0.0
    for pos, neg in by_group.values():
        if pos and neg:
            n_pairs = len(pos) * len(neg)
            total += roc_auc(pos + neg, [1] * len(pos) + [0] * len(neg)) * n_pairs
            weight += n_pairs
    return total / weight if weight else float("nan")


def accuracy(scores: Sequence[float], labels: Sequence[bool | int], threshold: float = 0.5) -> float:
    """Share of samples where `score >= threshold` agrees with the label."""
    if not scores:
        return float("nan")
    return sum((s >= threshold) == bool(y) for s, y in zip(scores, labels)) / len(scores)


# The scalar Bradley-Terry RM (`rm.scalar`, the `scalar_rm` reward) scores the whole conversation, no verifier prompt.
def conversation_ids(tok, problem: str, response: str) -> list[int]:
    """The problem and response as one chat (no budget line): what the scalar RM scores."""
    msgs = [{"role": "user", "content": problem}, {"role": "assistant", "content": response}]
    return list(tok.apply_chat_template(msgs, tokenize=True, return_dict=False))


def scalar_scores(model, tok, recs: list[dict], batch_size: int) -> list[float]:
    """The scalar (Bradley-Terry) RM's reward per record (`problem`, `response`): right-padded; the
    sequence-classification head reads the last non-pad token."""
    import torch

    device = next(model.parameters()).device
    out = []
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(recs), batch_size):
            rows = [conversation_ids(tok, r["problem"], r["response"]) for r in recs[lo:lo + batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows], device=device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
            out += model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
    return out
