"""What the RL driver takes from the task's hooks besides its rewards (pure: tensors and text, no workers).

- `first_error_marks`: the verifiable process reward of `process_penalty`, placed on the token where each
  response's first error starts (the task's `first_error` hook);
- `demo_batch`: the demonstrations of `ptx_coef` (InstructGPT's PPO-ptx), the step's problems as the SFT stage
  writes them (the task's `demonstrations` hook).
"""

from __future__ import annotations

import torch


def first_error_marks(tokenizer, batch, problems, penalty: float, first_error=None) -> torch.Tensor:
    """(B, T) float: -penalty on the response token where each row's first error starts
    (`first_error(problem, text)`, a character offset or None: the task's hook; by default the embedded task's
    `tasks.trace_lines.first_error_offset`), 0 elsewhere and on rows that are right.

    The character offset is mapped to a token through the tokens' own decoded pieces; a row whose pieces do not
    rebuild its text (not seen with the embedded tokenizer) gets no mark rather than a wrong one.
    """
    from posttrain.tasks.trace_lines import first_error_offset

    first_error = first_error or first_error_offset
    marks = torch.zeros(batch.response_ids.shape, dtype=torch.float32)
    lengths = batch.response_mask.sum(1).tolist()
    offsets = [first_error(problems[g], text) for g, text in zip(batch.group_index, batch.texts)]
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


def demo_batch(tokenizer, problems, budgets: list[int | None], pad_id: int, traces: str = "fitting", fit=None,
               full=None):
    """`learner.DemoBatch` of the step's problems as the SFT stage demonstrates them (for `ptx_coef`): with a
    budget, `fit(problem, budget, count_tokens)` (the task's `budget_demonstration`, as the SFT stage draws it; by
    default the embedded task's most explicit fitting trace, `fit_trace`); without one, the full trace
    `full(problem)` (the task's `demonstration`; by default the embedded task's verbose trace); budget 0, the answer
    alone. One demonstration per problem, in problem order.

    traces="full": only the full verbose trace is demonstrated (without a budget, or with one it fits, whatever the
    demonstrator drew); a problem whose budget needs a compressed trace (or no trace: budget 0) keeps its row with
    nothing to imitate, so how to compress is left to RL.
    """
    from posttrain.learner import DemoBatch
    from posttrain.sft_data import tokenize_example
    from posttrain.tasks.arithmetic import fit_trace, make_trace
    from posttrain.tokenizer import count_tokens

    fit, full_trace = fit or fit_trace, full or (lambda p: make_trace(p, "verbose", 1))
    rows = []
    count = lambda t: count_tokens(tokenizer, t)  # noqa: E731
    for p, b in zip(problems, budgets):
        full = full_trace(p)
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
