"""What the RL driver takes from the embedded task besides its rewards (pure: tensors and text, no workers).

- `first_error_marks`: the verifiable process reward of `process_penalty`, placed on the token where each
  response's first error starts (`tasks.trace_lines.first_error_offset`);
- `demo_batch`: the demonstrations of `ptx_coef` (InstructGPT's PPO-ptx), the step's problems as the SFT stage
  writes them.
"""

from __future__ import annotations

import torch


def first_error_marks(tokenizer, batch, problems, penalty: float, read_back: bool = False) -> torch.Tensor:
    """(B, T) float: -penalty on the response token where each row's first error starts
    (`tasks.trace_lines.first_error_offset`; `read_back`: the SFT data taught reading the problem back first, which
    is then no error), 0 elsewhere and on rows that are right.

    The character offset is mapped to a token through the tokens' own decoded pieces; a row whose pieces do not
    rebuild its text (not seen with the embedded tokenizer) gets no mark rather than a wrong one.
    """
    from posttrain.tasks.trace_lines import first_error_offset

    marks = torch.zeros(batch.response_ids.shape, dtype=torch.float32)
    lengths = batch.response_mask.sum(1).tolist()
    offsets = [first_error_offset(problems[g], text, read_back=read_back)
               for g, text in zip(batch.group_index, batch.texts)]
    wrong = {r: o for r, o in enumerate(offsets) if o is not None}
    ids = sorted({i for r in wrong for i in batch.response_ids[r, :lengths[r]].tolist()})
    decoded = dict(zip(ids, tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=True)))  # each id once
    for r, offset in wrong.items():
        text = batch.texts[r]
        pieces = [decoded[i] for i in batch.response_ids[r, :lengths[r]].tolist()]
        shift = len(text) - sum(map(len, pieces))  # budget 0: the text starts with the prompt's "</think>\n\n"
        if shift < 0 or text[shift:] != "".join(pieces) or offset < shift:
            continue
        end = shift
        for t, piece in enumerate(pieces):
            end += len(piece)
            if end > offset:
                marks[r, t] = -penalty
                break
    return marks


def demo_batch(tokenizer, problems, budgets: list[int | None], pad_id: int, traces: str = "fitting", fit=None):
    """`learner.DemoBatch` of the step's problems as the SFT stage demonstrates them (for `ptx_coef`): with a
    budget, `fit(problem, budget, count_tokens)` (the SFT stage's demonstrator, `sft_data.budget_trace`; default
    `fit_trace`, the most explicit); without one, the full verbose trace; budget 0, the answer alone. One
    demonstration per problem, in problem order.

    traces="full": only the full verbose trace is demonstrated (without a budget, or with one it fits, whatever the
    demonstrator drew); a problem whose budget needs a compressed trace (or no trace: budget 0) keeps its row with
    nothing to imitate, so how to compress is left to RL.
    """
    from posttrain.learner import DemoBatch
    from posttrain.sft_data import tokenize_example
    from posttrain.tasks.arithmetic import fit_trace, make_trace
    from posttrain.tokenizer import count_tokens

    fit = fit or fit_trace
    rows = []
    count = lambda t: count_tokens(tokenizer, t)  # noqa: E731
    for p, b in zip(problems, budgets):
        full = make_trace(p)
        fits_full = b is not None and b > 0 and count(full) <= b
        # `full`: the full trace wherever it fits, whichever trace the SFT demonstrator drew (a budget-blind one,
        # `sft.budget_traces: full` or `full_read_back`, overruns; `sampled` may compress); nothing elsewhere
        thinking = full if b is None or (traces == "full" and fits_full) else fit(p, b, count) if b > 0 else ""
        ex = tokenize_example(tokenizer, p.expression, b, thinking, str(p.answer))
        cut = ex["completion_mask"].index(1)
        imitate = traces == "fitting" or b is None or fits_full
        rows.append((ex["input_ids"][:cut], ex["input_ids"][cut:], imitate))
    n, P, T = len(rows), max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    out = DemoBatch(torch.full((n, P), pad_id), torch.zeros((n, P), dtype=torch.long),
                    torch.full((n, T), pad_id), torch.zeros((n, T), dtype=torch.long))
    for i, (a, c, imitate) in enumerate(rows):
        out.prompt_ids[i, P - len(a):], out.prompt_mask[i, P - len(a):] = torch.tensor(a), 1
        out.response_ids[i, :len(c)], out.response_mask[i, :len(c)] = torch.tensor(c), int(imitate)
    return out


def sft_demonstrator(sft_cfg, rng):
    """`fit` for `demo_batch`: the budgeted traces the recipe's SFT stage demonstrates (`sft.budget_traces` and
    its shares; `rng` draws them for `sampled`)."""
    from posttrain.sft_data import budget_trace

    return lambda p, budget, count: budget_trace(p, budget, count, rng, sft_cfg.budget_traces,
                                                 sft_cfg.full_trace_share, sft_cfg.truncate_share)
