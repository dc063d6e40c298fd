"""Splitting and joining `RolloutBatch`es: the driver spreads prompts over rollout workers and groups over
data-parallel learners. Pure tensor bookkeeping, no models.

Layout kept throughout: prompts left-padded (with `pad_id`, mask 0), responses right-padded (pad id, mask 0,
logp 0, forced False); `routing` (L, B, P + T, k) is padded with -1 (= not recorded: the router decides).
"""

from __future__ import annotations

import dataclasses

import torch

_LIST_FIELDS = ("n_think", "closed", "forced", "budgets", "texts")


def select_rows(batch, lo: int, hi: int):
    """Rows lo..hi of the batch (a view on the same tensors); group indices are kept as they were."""
    out = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    for k, v in out.items():
        if k == "routing":
            out[k] = None if v is None else v[:, lo:hi]
        elif isinstance(v, torch.Tensor):
            out[k] = v[lo:hi]
        elif isinstance(v, list):
            out[k] = v[lo:hi]
    return type(batch)(**out)


def _pad_to(x: torch.Tensor, width: int, value, left: bool, dim: int = 1) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    pad = torch.full(shape, value, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], dim=dim)


def concat_batches(batches: list, pad_id: int):
    """One batch from several (rows in order); `group_index` is offset so groups stay distinct."""
    if len(batches) == 1:
        return batches[0]
    P = max(b.prompt_ids.shape[1] for b in batches)
    T = max(b.response_ids.shape[1] for b in batches)
    out: dict = {
        "prompt_ids": torch.cat([_pad_to(b.prompt_ids, P, pad_id, left=True) for b in batches]),
        "prompt_mask": torch.cat([_pad_to(b.prompt_mask, P, 0, left=True) for b in batches]),
        "response_ids": torch.cat([_pad_to(b.response_ids, T, pad_id, left=False) for b in batches]),
        "response_mask": torch.cat([_pad_to(b.response_mask, T, 0, left=False) for b in batches]),
        "logp": torch.cat([_pad_to(b.logp, T, 0.0, left=False) for b in batches]),
        "forced_mask": torch.cat([_pad_to(b.forced_mask, T, False, left=False) for b in batches]),
    }
    for k in _LIST_FIELDS:
        out[k] = [x for b in batches for x in getattr(b, k)]
    offset, groups = 0, []
    for b in batches:
        groups += [g + offset for g in b.group_index]
        offset += (max(b.group_index) + 1) if b.group_index else 0
    out["group_index"] = groups
    if "versions" in {f.name for f in dataclasses.fields(batches[0])}:
        vs = [b.versions for b in batches]
        out["versions"] = None if any(v is None for v in vs) else [x for v in vs for x in v]
    names = {f.name for f in dataclasses.fields(batches[0])}
    if "routing" in names:
        rs = [b.routing for b in batches]
        if any(r is None for r in rs):
            out["routing"] = None
        else:
            parts = []
            for b, r in zip(batches, rs):
                p, t = b.prompt_ids.shape[1], b.response_ids.shape[1]
                prompt, resp = r[:, :, :p], r[:, :, p:]
                parts.append(torch.cat([_pad_to(prompt, P, -1, left=True, dim=2),
                                        _pad_to(resp, T, -1, left=False, dim=2)], dim=2))
            out["routing"] = torch.cat(parts, dim=1)
    for k in names - set(out):
        out[k] = getattr(batches[0], k)
    return type(batches[0])(**out)


def compact(batch, lo: int, hi: int):
    """(rows lo..hi without the columns that are padding in every one of them, response column slice).

    Prompts are left-padded and responses right-padded, so a block of rows needs only the last `p` prompt
    columns and the first `t` response columns (p, t: its longest prompt and response). The learner and the
    reference compute no padding this way; other (B, T) tensors are cut with the returned slice.
    """
    part = select_rows(batch, lo, hi)
    P, T = part.prompt_ids.shape[1], part.response_ids.shape[1]
    p = int(part.prompt_mask.sum(1).max()) if hi > lo else P
    t = max(1, int(part.response_mask.sum(1).max())) if hi > lo else T
    if p == P and t == T:
        return part, slice(0, T)
    out = {f.name: getattr(part, f.name) for f in dataclasses.fields(part)}
    for k in ("prompt_ids", "prompt_mask"):
        out[k] = out[k][:, P - p:]
    for k in ("response_ids", "response_mask", "logp", "forced_mask"):
        out[k] = out[k][:, :t]
    if out.get("routing") is not None:
        out["routing"] = out["routing"][:, :, P - p:P + t]
    return type(part)(**out), slice(0, t)


def micro_slices(batch, lo: int, hi: int, max_tokens: int | None) -> list[tuple[int, int]]:
    """Rows lo..hi cut into contiguous micro-batches whose padded size, rows x (longest prompt + longest
    response) among them (what the forward computes after `compact`), stays within `max_tokens`; a row longer
    than that is a micro-batch of its own. None: one micro-batch."""
    if max_tokens is None or hi - lo <= 1:
        return [(lo, hi)]
    lengths = list(zip(batch.prompt_mask[lo:hi].sum(1).tolist(), batch.response_mask[lo:hi].sum(1).tolist()))
    out, start, p, t = [], lo, 0, 0
    for i, (pl, rl) in enumerate(lengths, start=lo):
        np_, nt = max(p, int(pl)), max(t, max(1, int(rl)))
        if i > start and (i + 1 - start) * (np_ + nt) > max_tokens:
            out.append((start, i))
            start, np_, nt = i, int(pl), max(1, int(rl))
        p, t = np_, nt
    out.append((start, hi))
    return out


def group_bounds(n_rows: int, group_size: int, parts: int) -> list[tuple[int, int]]:
    """Split rows 0..n_rows into `parts` contiguous ranges of whole groups (some may be empty)."""
    n_groups = n_rows // group_size
    cuts = [round(i * n_groups / parts) * group_size for i in range(parts + 1)]
    return list(zip(cuts, cuts[1:]))
