"""A learner step's metrics from its parts: micro-batches into a mini-batch (`_weighted`), mini-batches into the
step (`_average`). Split out of `posttrain.learner`, which re-exports both."""

from __future__ import annotations

from collections.abc import Sequence


def _weighted(parts: Sequence[tuple[dict, float, float]]) -> dict:
    """One mini-batch's metrics from its micro-batches' (metrics, loss_agg count, loss tokens): the policy loss
    and the total loss weighted by the loss_agg's count (tokens for token_mean, sequences otherwise), the other
    floats (token means: KL, entropy, clip fractions, ratios) by loss tokens, which gives the one-pass values
    (the total loss mixes both kinds and is close, not exact, under the sequence aggregations)."""
    if len(parts) == 1:
        return dict(parts[0][0])
    by_agg, by_tokens = (sum(p[i] for p in parts) or 1.0 for i in (1, 2))
    out: dict = {}
    for metrics, n_agg, n_tokens in parts:
        for k, v in metrics.items():
            w = n_agg / by_agg if k in ("actor/pg_loss", "actor/loss") else n_tokens / by_tokens
            out[k] = out.get(k, 0.0) + v * w if isinstance(v, float) else v
    return out


def _average(collected: Sequence[dict]) -> dict[str, float]:
    """Mean of each float metric over the mini-batches that reported it; the last skip reason is kept."""
    out: dict = {}
    keys = {k for m in collected for k in m}
    for k in keys:
        vals = [m[k] for m in collected if k in m and isinstance(m[k], (int, float))]
        if vals:
            out[k] = sum(vals) / len(vals)
        else:
            out[k] = [m[k] for m in collected if k in m][-1]
    out["actor/clipfrac"] = out.get("actor/clipfrac_low", 0.0) + out.get("actor/clipfrac_high", 0.0)
    return out
