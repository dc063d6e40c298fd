"""Distillation losses: a student's next-token distribution against a teacher's, position by position.

Pure torch, no IO. Positions come flattened: N target positions (the response tokens of a batch of sequences,
row-major), V the vocabulary, k the teacher's kept ids. Every loss returns the per-position loss (N,); the caller
takes the token mean (`distill_loss`).

The teacher's distribution is stored k-sparse (`topk_targets`): per position its top-k ids (int), their log-probs
and the log of the mass left outside them (`tail_logp`). Objectives (the recipe's `distill.loss`):

* ``sparse_kl`` (default): forward KL(p_k || q) between the teacher's top-k distribution p_k, renormalised over the
  k ids (zero elsewhere), and the student's full softmax q. Forward KL is the cross-entropy to the teacher's
  distribution minus its (constant) entropy: mode-covering, so the student spreads mass over every token the
  teacher finds plausible instead of collapsing onto one of them, and its gradient is the plain
  `q - p` on the logits, what logit distillation (Hinton et al. 2015) and sparse logit distillation use. The
  reverse KL(q || p_k) would be mode-seeking and is undefined off the k ids, where p_k is 0. With
  ``tail="bucket"`` the k ids get one more outcome, "any other token", holding the teacher's tail mass; the
  student's bucket is its mass outside the k ids (1 - sum of its k probabilities, computed as a logsumexp), and
  the KL runs over those k + 1 outcomes: the student is no longer pushed to put the tail's mass on the top k.
* ``full_kl``: the same forward KL against the teacher's full-vocabulary distribution, its logits computed on the
  fly (no storage; a teacher forward per step).
* ``sft``: cross-entropy of the sampled tokens of the teacher's outputs (sequence-level KD, Kim & Rush 2016).

With k = V both sparse forms equal ``full_kl`` (the tests check it to float64 precision).

Sparse Logit Sampling (Anshumann et al. 2025, "Sparse Logit Sampling: Accelerating Knowledge Distillation in
LLMs") shows that caching the teacher's top-k probabilities gives a *biased* estimate of the teacher's distribution
(the tail is dropped, or lumped, and the kept mass renormalised, so the student is taught the teacher's head as
too likely), and proposes "random sampling KD": ids drawn from the teacher's distribution with importance weights,
whose expected gradient equals the full KL's (unbiased), at the same storage. This module implements the top-k
baseline they compare against, with the bucket as a cheap correction of the tail's mass (not of its shape): it is
deterministic and stores the same k ids whatever the seed. How much mass the top k leave out is measured: the stage's
summary reports the teacher's mean tail mass over the stored positions (`targets.tail_mass_mean`).
"""

from __future__ import annotations

import torch

LOSSES = ("sparse_kl", "full_kl", "sft")
TAILS = ("renormalize", "bucket")


def _f(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32, or float64 when it is already (low-precision logits and fp16 targets are upcast)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def topk_targets(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's k-sparse distribution at each position.

    Args:
        teacher_logits: (N, V) logits (any float dtype; computed in float32, or float64 if given).
        k: ids kept per position, 1 <= k <= V.

    Returns:
        (ids (N, k) long, sorted by decreasing probability; logp (N, k) float32 (float64 for float64 logits), their
        log-probs under the full softmax; tail_logp (N,) in the same dtype, log of the mass outside the k ids: -inf
        when k = V).
    """
    n_vocab = teacher_logits.shape[-1]
    if not 1 <= k <= n_vocab:
        raise ValueError(f"k must be in 1..{n_vocab} (the vocabulary), got {k}")
    logp_all = torch.log_softmax(_f(teacher_logits), dim=-1)
    logp, ids = logp_all.topk(k, dim=-1)
    if k == n_vocab:
        tail = torch.full(logp.shape[:-1], float("-inf"), dtype=logp.dtype, device=logp.device)
    else:  # logsumexp of the rest: exact even when the kept mass rounds to 1 in float32
        tail = logp_all.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, logp, tail


def _kl_terms(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_i p_i (log p_i - log q_i) over the last dim, 0 where p_i = 0 (0 log 0 = 0); (..., M) -> (...)."""
    p = logp.exp()
    keep = p > 0
    diff = torch.where(keep, logp - logq, torch.zeros_like(logq))  # -inf - -inf never reaches the sum or its grad
    return (p * diff).sum(-1)


def sparse_kl(student_logits: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor,
              tail_logp: torch.Tensor | None = None) -> torch.Tensor:
    """Forward KL from the teacher's k-sparse distribution to the student, per position.

    Args:
        student_logits: (N, V) student logits (with grad).
        ids: (N, k) the teacher's top-k ids (distinct per row).
        logp: (N, k) their teacher log-probs (float16 from storage is fine: renormalised here in float32).
        tail_logp: (N,) log of the teacher's mass outside the k ids, or None. None: renormalised top-k,
            KL(p_k || q) with p_k = softmax(logp) on the k ids and q the student's full softmax. Given: the bucket
            form, KL over the k ids plus one outcome for the rest (the teacher's tail against the student's
            mass outside the k ids); the k + 1 teacher probabilities are renormalised to sum to 1.

    Returns:
        (N,) KL per position (float32, float64 for float64 inputs), >= 0.
    """
    logq = torch.log_softmax(_f(student_logits), dim=-1)
    ids = ids.long()
    logq_k = logq.gather(-1, ids)
    if tail_logp is None or ids.shape[-1] == logq.shape[-1]:  # k = V: the bucket is empty for both
        p_k = _f(logp) - _f(logp).logsumexp(-1, keepdim=True)
        return _kl_terms(p_k, logq_k)
    teacher = torch.cat([_f(logp), _f(tail_logp)[..., None]], dim=-1)
    teacher = teacher - teacher.logsumexp(-1, keepdim=True)
    rest = logq.scatter(-1, ids, float("-inf")).logsumexp(-1)  # the student's mass off the k ids, stably
    return _kl_terms(teacher, torch.cat([logq_k, rest[..., None]], dim=-1))


def full_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Forward KL(p || q) over the whole vocabulary, per position: (N, V), (N, V) -> (N,) float32."""
    logp = torch.log_softmax(_f(teacher_logits), dim=-1)
    return _kl_terms(logp, torch.log_softmax(_f(student_logits), dim=-1))


def sampled_ce(student_logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the teacher's sampled tokens, per position: (N, V), (N,) ids -> (N,) float32."""
    logq = torch.log_softmax(_f(student_logits), dim=-1)
    return -logq.gather(-1, target_ids.long()[:, None]).squeeze(-1)


def distill_loss(
    kind: str,
    student_logits: torch.Tensor,
    *,
    ids: torch.Tensor | None = None,
    logp: torch.Tensor | None = None,
    tail_logp: torch.Tensor | None = None,
    tail: str = "renormalize",
    teacher_logits: torch.Tensor | None = None,
    target_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The token-mean loss of `kind` (`LOSSES`) over N positions, and its metrics.

    Args:
        kind: ``sparse_kl`` (needs ids, logp and, with ``tail="bucket"``, tail_logp), ``full_kl`` (needs
            teacher_logits (N, V)) or ``sft`` (needs target_ids (N,)).
        student_logits: (N, V).

    Returns:
        (scalar loss, ``{"distill/loss", "distill/top1_match"}``): the match is the share of positions where the
        student's argmax is the teacher's most likely id (ids[:, 0], the teacher's argmax, or the sampled token).
    """
    if kind == "sparse_kl":
        if tail not in TAILS:
            raise ValueError(f"unknown tail {tail!r}; known: {', '.join(TAILS)}")
        per = sparse_kl(student_logits, ids, logp, tail_logp if tail == "bucket" else None)
        top1 = ids[:, 0]
    elif kind == "full_kl":
        per = full_kl(student_logits, teacher_logits)
        top1 = teacher_logits.argmax(-1)
    elif kind == "sft":
        per = sampled_ce(student_logits, target_ids)
        top1 = target_ids
    else:
        raise ValueError(f"unknown distillation loss {kind!r}; known: {', '.join(LOSSES)}")
    loss = per.mean()
    match = (student_logits.detach().argmax(-1) == top1.long()).float().mean()
    return loss, {"distill/loss": float(loss.detach()), "distill/top1_match": float(match)}
