"""The decoder: batched KV-cache sampling through the chat template, with per-token log-probs and budget forcing.

The one decoding loop of the project. `Decoder(model, tokenizer).generate(...)` returns a `RolloutBatch`; the RL
stage's and the sweep's `posttrain.workers.rollout.RolloutWorker` is a `Decoder` that also loads checkpoints and
takes weights from the learner, and `posttrain.generate.generate` (the eval stage, the RM stage's samples, the
export check) wraps a `Decoder` around an in-process model. It runs its own loop instead of `model.generate`
because the learner needs, for every response token, the policy's log-prob of the token that was emitted (`logp`)
and whether that token was forced (`forced_mask`). HF `generate` + `ThinkCap` (`posttrain.generate.
reference_generate`) is kept only as the independent reference of the tests and the benchmark's peer.

How it differs from HF `generate` + `ThinkCap` and from s1's budget forcing (Muennighoff et al. 2025):
- each distinct prompt is prefilled once and its KV cache repeated to its group of `group_size` samples (GRPO
  groups share a prompt), instead of one prefill per sample;
- `logp` is log_softmax of the raw logits (temperature 1, no top-p): the policy's own log-prob, the quantity a
  PPO/GRPO ratio needs. The token itself is drawn from the tempered, nucleus-truncated distribution, so with
  temperature != 1 or top_p < 1 the behaviour policy is not exactly the policy whose `logp` is recorded;
- a row that has spent its budget of thinking tokens without writing `</think>` gets `</think>` forced; it
  counts as forced only when the row's own *sample* was not `</think>` (ThinkCap can only judge by the argmax).
  With `budget_in_prompt=False` the prompt states no budget (autonomous mode) and the same cap applies: s1's budget
  forcing of a model that was given no budget (the sweep's `forced` mode);
- `n_think` counts every token generated before `</think>`, exactly what the cap counts (unlike
  `count_think_tokens_ids`, a `<think>` the model writes again does not restart the count);
- rows stop individually at EOS and are dropped from the batch (and from the cache), so finished rows cost
  nothing; the loop ends when all rows are done or after `max_new_tokens`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from posttrain.tokenizer import think_token_ids

_NO_CAP = 2**62


def render_prompts(tokenizer, prompts: list[str], budgets: list[int | None]) -> list[str]:
    """The chat-template text of each prompt: an int budget renders the budget instruction (0 pre-fills an empty
    think block), None the autonomous prompt; both end inside the assistant turn, ready to generate."""
    out = []
    for p, b in zip(prompts, budgets):
        kw = {} if b is None else {"thinking_budget": int(b)}
        out.append(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 tokenize=False, **kw))
    return out


def check_generate_args(prompts, budgets, group_size: int, max_new_tokens: int, temperature: float,
                        top_p: float) -> None:
    """The checks every rollout engine's `generate` makes first (ValueError naming the bad argument)."""
    if len(prompts) != len(budgets):
        raise ValueError(f"{len(prompts)} prompts but {len(budgets)} budgets")
    if group_size < 1 or max_new_tokens < 1:
        raise ValueError(f"group_size and max_new_tokens must be >= 1, got {group_size}, {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")


@dataclass
class RolloutBatch:
    """B = len(prompts) * group_size rows; the `group_size` samples of a prompt are adjacent."""

    prompt_ids: torch.Tensor  # (B, P) long, left-padded with the pad id
    prompt_mask: torch.Tensor  # (B, P) long, 1 on prompt tokens
    response_ids: torch.Tensor  # (B, T) long, right-padded with the pad id after EOS
    response_mask: torch.Tensor  # (B, T) long, 1 on generated tokens (EOS included)
    logp: torch.Tensor  # (B, T) float32, log pi(token | prefix) at temperature 1; 0 where response_mask is 0
    forced_mask: torch.Tensor  # (B, T) bool, True on a forced </think>: exclude it from the policy loss
    n_think: list[int]  # thinking tokens: generated before </think> (all when unclosed; 0 for budget 0 in the prompt)
    closed: list[bool]  # </think> was written (by the model or forced; always True for budget 0 in the prompt)
    forced: list[bool]  # </think> was forced
    group_index: list[int]  # index of the row's prompt in the `prompts` given to `generate`
    budgets: list[int | None]
    texts: list[str]  # decoded responses, starting inside the think block ("</think>\n\n..." for budget 0)
    # (L, B, P + T, k) long, with `generate(record_routing=True)`: the top-k experts of every token of
    # cat([prompt_ids, response_ids], 1) in each MoE layer, -1 where not recorded (response padding and each
    # row's last token, never fed forward); replay it with `posttrain.moe.replay_routing` (R3)
    routing: torch.Tensor | None = None
    # the policy version (learner updates applied) of the weights that sampled each row, stamped by the RL stage's
    # `RolloutWorker`; None from a bare Decoder. The async RL driver drops rows too old for the learner
    versions: list[int] | None = None

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def loss_mask(self) -> torch.Tensor:
        """(B, T) long: response tokens the policy chose itself (forced tokens are not the policy's actions)."""
        return self.response_mask * (~self.forced_mask).long()


class Decoder:
    """Samples groups of responses from `model` (an HF causal LM, PEFT-wrapped or not) on `device` (default: the
    device of its parameters). Holds no state between calls but the model and the tokenizer's special ids."""

    def __init__(self, model, tokenizer, device=None):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.bind(model, tokenizer)

    def bind(self, model, tokenizer) -> None:
        """Decode with `model` and `tokenizer` from now on (a worker serving another checkpoint)."""
        self.model = model
        self.tokenizer = tokenizer
        self.think_start_id, self.think_end_id = think_token_ids(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        budgets: list[int | None],
        group_size: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        greedy: bool = False,
        cap: bool = True,
        record_routing: bool = False,
        budget_in_prompt: bool = True,
        generator: torch.Generator | None = None,
    ) -> RolloutBatch:
        """`group_size` responses per prompt. `greedy=True` or `temperature=0` decodes by argmax.

        `budgets[i]`: an int N renders the budget instruction and forces `</think>` after N thinking tokens
        (0 = the prompt pre-closes the think block); None = autonomous thinking, never forced. `cap=False`
        never forces: the budget is only the prompt's instruction (a sweep's natural mode).
        `budget_in_prompt=False` renders every prompt with no budget (autonomous) and keeps the cap: `</think>` is
        forced after `budgets[i]` thinking tokens, counted as with the budget in the prompt (budget 0: forced as the
        first token, since no prompt pre-closes the block); the sweep's `forced` mode.
        `record_routing=True` fills `RolloutBatch.routing` with every token's experts (MoE models only).
        `generator`: draw the samples from it (on `self.device`; `seed` is then unused), e.g. one generator over
        several calls.
        """
        check_generate_args(prompts, budgets, group_size, max_new_tokens, temperature, top_p)
        greedy = greedy or temperature == 0
        gen = generator
        if gen is None:
            gen = torch.Generator(device=self.device)
            if seed is None:
                gen.seed()
            else:
                gen.manual_seed(seed)
        self.model.eval()

        shown = budgets if budget_in_prompt else [None] * len(budgets)
        prompt_ids, prompt_mask = self._encode(render_prompts(self.tokenizer, prompts, shown))
        preclosed = [b == 0 for b in shown]  # budget 0 in the prompt: the think block is closed already
        caps = torch.tensor([int(b) if pre or (cap and b is not None) else _NO_CAP
                             for b, pre in zip(budgets, preclosed)], device=self.device)
        preclosed_rows = torch.tensor(preclosed, device=self.device).repeat_interleave(group_size)
        routing = recorder = None
        with contextlib.ExitStack() as stack:
            if record_routing:
                from posttrain import moe

                routers = moe.moe_routers(self.model)
                recorder = stack.enter_context(moe.record_routing(self.model))
                shape = (len(routers), prompt_ids.shape[0] * group_size, prompt_ids.shape[1] + max_new_tokens,
                         routers[0].top_k)
                routing = torch.full(shape, moe.UNRECORDED, dtype=torch.long, device=self.device)
            tokens, logp, forced_mask = self._decode(
                prompt_ids, prompt_mask, caps.repeat_interleave(group_size), group_size, max_new_tokens,
                lambda logits: _sample(logits, temperature, top_p, gen, greedy), routing, recorder, preclosed_rows,
            )
        batch = self._batch(prompt_ids, prompt_mask, tokens, logp, forced_mask, budgets, group_size, preclosed)
        if routing is not None:
            batch.routing = routing[:, :, :prompt_ids.shape[1] + batch.response_ids.shape[1]]
        return batch

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize and left-pad: (N, P) ids and mask."""
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _decode(self, prompt_ids, prompt_mask, caps, group_size, max_new_tokens, sample, routing=None,
                recorder=None, preclosed=None):
        """The decoding loop. caps: (B,) thinking budget per row; preclosed: (B,) bool, rows whose prompt closed the
        think block (default: those of cap 0). Returns (B, max_new_tokens) tokens, logp and
        forced_mask; positions after a row's EOS hold the pad id, logp 0 and False. With `recorder` (a
        `posttrain.moe.RoutingRecorder` on the model), each forward's routing is scattered into `routing`, an
        (L, B, P + max_new_tokens, k) buffer, at the rows and positions of the tokens it fed."""
        from transformers import DynamicCache

        n_rows = prompt_ids.shape[0] * group_size
        # Left padding: real tokens get positions 0.., padding gets 0 (as HF generate); padding is masked anyway.
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float().repeat_interleave(group_size, dim=0)  # (B, V)
        prompt_width = prompt_ids.shape[1]
        if recorder is not None:  # the prefill ran each distinct prompt once: repeat to the group, as the cache
            prefill = torch.stack(recorder.pop()).unflatten(1, prompt_ids.shape)  # (L, prompts, P, k)
            routing[:, :, :prompt_width] = prefill.repeat_interleave(group_size, dim=1)
        cache.batch_repeat_interleave(group_size)
        mask = prompt_mask.repeat_interleave(group_size, dim=0)
        next_pos = positions[:, -1].repeat_interleave(group_size) + 1  # prompts end with a real token

        tokens = torch.full((n_rows, max_new_tokens), self.pad_id, dtype=torch.long, device=self.device)
        logp = torch.zeros((n_rows, max_new_tokens), dtype=torch.float32, device=self.device)
        forced_mask = torch.zeros((n_rows, max_new_tokens), dtype=torch.bool, device=self.device)
        closed = (caps == 0) if preclosed is None else preclosed.clone()  # the prompt already closed the block
        active = torch.arange(n_rows, device=self.device)  # rows still generating, in cache order
        for t in range(max_new_tokens):
            tok = sample(logits)
            # every token generated while the block is open is thinking, so t is the row's thinking count
            force = ~closed[active] & (t >= caps[active])
            forced_mask[active, t] = force & (tok != self.think_end_id)
            tok = torch.where(force, torch.full_like(tok, self.think_end_id), tok)
            tokens[active, t] = tok
            logp[active, t] = torch.log_softmax(logits, dim=-1).gather(1, tok[:, None]).squeeze(1)
            closed[active] = closed[active] | (tok == self.think_end_id)
            if t == max_new_tokens - 1:
                break
            running = tok != self.eos_id
            if not running.all():
                keep = running.nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                cache.batch_select_indices(keep)
                active, mask, next_pos, tok = active[keep], mask[keep], next_pos[keep], tok[keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                             past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1].float()
            next_pos = next_pos + 1
            if recorder is not None:  # this step fed token t of the rows still running
                routing[:, active, prompt_width + t] = torch.stack(recorder.pop())
        return tokens, logp, forced_mask

    def _batch(self, prompt_ids, prompt_mask, tokens, logp, forced_mask, budgets, group_size,
               preclosed) -> RolloutBatch:
        ended = tokens == self.eos_id
        # 1 up to and including the first EOS (or everywhere when the row never ended)
        response_mask = (ended.long().cumsum(1) - ended.long() == 0).long()
        width = int(response_mask.sum(1).max())
        tokens, logp, forced_mask, response_mask = (x[:, :width] for x in (tokens, logp, forced_mask, response_mask))
        row_budgets = [b for b in budgets for _ in range(group_size)]
        row_preclosed = [p for p in preclosed for _ in range(group_size)]
        n_think, closed, texts = [], [], []
        for ids, n, pre in zip(tokens.tolist(), response_mask.sum(1).tolist(), row_preclosed):
            ids = ids[:n]
            if pre:
                think, is_closed = 0, True
            elif self.think_end_id in ids:  # the completion starts inside the think block: count from 0
                think, is_closed = ids.index(self.think_end_id), True
            else:
                think, is_closed = len(ids), False
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            n_think.append(think)
            closed.append(is_closed)
            texts.append("</think>\n\n" + text if pre else text)
        return RolloutBatch(
            prompt_ids=prompt_ids.repeat_interleave(group_size, dim=0),
            prompt_mask=prompt_mask.repeat_interleave(group_size, dim=0),
            response_ids=tokens,
            response_mask=response_mask,
            logp=logp,
            forced_mask=forced_mask,
            n_think=n_think,
            closed=closed,
            forced=forced_mask.any(1).tolist(),
            group_index=[i for i in range(len(budgets)) for _ in range(group_size)],
            budgets=row_budgets,
            texts=texts,
        )


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator, greedy: bool):
    """(A, V) float logits -> (A,) token ids: argmax, or a draw from the tempered nucleus (top-p) distribution."""
    if greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token once the mass before it already reaches top_p (the most likely token always stays)
        sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)
