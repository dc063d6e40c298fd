"""The embedded model's tokenizer: byte-level BPE with whole-number tokens and a budget-aware chat template.

Byte-level, so any text round-trips (real datasets, code). Digits are pre-split into runs of at most two and an
operator is kept with the digit after it, so every number 0..99 and every operator-operand pair (`*2`) of the
arithmetic task is one token once BPE has merged it. A reasoning step is then four or five tokens, and finding
the next operand in the problem is a one-token lookup (an induction head) rather than a two-hop one. Saved as a standard `PreTrainedTokenizerFast` (tokenizer.json + chat_template.jinja): `AutoTokenizer`
loads it with no posttrain code.
"""

from __future__ import annotations

import random
from importlib import resources

from posttrain.tasks.arithmetic import generate_problems, make_trace, trace_ladder

PAD, EOS, IM_START, THINK_START, THINK_END = "<|endoftext|>", "<|im_end|>", "<|im_start|>", "<think>", "</think>"
SPECIAL_TOKENS = [PAD, IM_START, EOS]
THINK_TOKENS = [THINK_START, THINK_END]

# A little English so that words in prompts, templates and real datasets are not all single bytes.
_ENGLISH = (
    "system user assistant Thinking budget tokens Think step by step The answer is Question Answer "
    "how many what is the total of each and then has have had more less than apples books students costs "
    "dollars per day week hours minutes sold bought gave left remaining half twice three four five "
    "Is the answer correct? Yes No Problem Response def return print for in if else import"
)


# operator+digit pairs, numbers in runs of at most two digits, words (with their leading space), punctuation, space
_PRE_TOKENIZE = r"[-+*]\d|\d{1,2}| ?[A-Za-z]+| ?[^\sA-Za-z\d]+|\s+"


def chat_template() -> str:
    return resources.files("posttrain").joinpath("chat_template.jinja").read_text()


def _training_corpus(seed: int, n_problems: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for p in generate_problems(n_problems, seed):
        style, group = rng.choice(trace_ladder(p))
        texts.append(f"{p.expression}\n{make_trace(p, style, group)}\n={p.answer}")
    texts += [f"Thinking budget: {b} tokens." for b in range(1, 257)]
    texts += [" ".join(str(n) for n in range(100))] * 50  # every task value 0..99 becomes one token
    texts += ["".join(op + str(d) for op in "+-*" for d in range(10))] * 50  # and every operator-digit pair
    texts += [_ENGLISH] * 20
    return texts


def build_tokenizer(vocab_size: int = 512, seed: int = 0, extra_texts=()):
    """Train the tokenizer on a synthetic corpus (and `extra_texts`: a task's own text, `Task.tokenizer_texts`);
    returns a `PreTrainedTokenizerFast` with the chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AddedToken, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRE_TOKENIZE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(seed, 4000) + list(extra_texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        bos_token=None,
        unk_token=None,
        model_max_length=1024,
    )
    # <think> / </think> are added (never split) but not "special": decoding with skip_special_tokens keeps them.
    fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    fast.add_special_tokens({"additional_special_tokens": [IM_START]})
    fast.chat_template = chat_template()
    wanted = [str(n) for n in range(100)] + [op + str(d) for op in "+-*" for d in range(10)]
    missing = [w for w in wanted if len(fast(w, add_special_tokens=False)["input_ids"]) != 1]
    if missing:
        raise RuntimeError(f"tokenizer did not learn whole-number tokens for {missing[:10]}; raise vocab_size")
    return fast


def think_token_ids(tokenizer) -> tuple[int, int]:
    """Ids of `<think>` and `</think>`; a clear error when the tokenizer does not follow the convention."""
    ids = []
    for t in THINK_TOKENS:
        i = tokenizer.convert_tokens_to_ids(t)
        if i is None or i == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {t!r} token: it does not follow the <think>...</think> convention")
        ids.append(i)
    return ids[0], ids[1]


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
