import pytest
from transformers import AutoTokenizer

from posttrain.rewards.parse import count_think_tokens_ids, grade_integer, split_think
from posttrain.tokenizer import THINK_END, THINK_START, think_token_ids

MSG = [{"role": "user", "content": "7+3*2-5"}]


def render(tok, **kw):
    return tok.apply_chat_template(MSG, add_generation_prompt=True, tokenize=False, **kw)


@pytest.mark.parametrize("text", ["7+3=10\n10*2=20", "Natalia sold 48 clips in April (ümlaut, 中文) 123456.", "  x\t\n"])
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_task_numbers_are_single_tokens(tokenizer):
    for n in range(100):
        assert len(tokenizer(str(n), add_special_tokens=False)["input_ids"]) == 1


def test_three_budget_modes(tokenizer):
    auto, zero, b32 = render(tokenizer), render(tokenizer, thinking_budget=0), render(tokenizer, thinking_budget=32)
    assert auto.endswith("<|im_start|>assistant\n<think>") and "budget" not in auto
    assert zero.endswith("<think></think>\n\n") and "budget" not in zero
    assert "Thinking budget: 32 tokens." in b32 and b32.endswith("<think>")
    assert render(tokenizer, thinking_budget=None) == auto
    assert "Thinking budget: 7 tokens." in render(tokenizer, thinking_budget=7)


def test_budget_joins_existing_system_message(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}] + MSG
    out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, thinking_budget=16)
    assert out.startswith("<|im_start|>system\nBe brief.\nThinking budget: 16 tokens.<|im_end|>\n")
    assert out.count("<|im_start|>system") == 1


def test_bad_budget_is_rejected(tokenizer):
    with pytest.raises(Exception, match="thinking_budget"):
        render(tokenizer, thinking_budget=-1)


@pytest.mark.parametrize("budget", [None, 0, 24])
def test_prompt_is_prefix_of_full_conversation(tokenizer, budget):
    kw = {} if budget is None else {"thinking_budget": budget}
    thinking = "" if budget == 0 else "7+3=10\n10*2=20\n20-5=15"
    full = tokenizer.apply_chat_template(MSG + [{"role": "assistant", "content": "15", "reasoning_content": thinking}],
                                         tokenize=False, **kw)
    prompt = render(tokenizer, **kw)
    assert full.startswith(prompt)
    turn = full[full.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n"):]
    assert turn.startswith(THINK_START)
    assert grade_integer(turn, 15) and split_think(turn).thinking == thinking
    assert not grade_integer(turn, 16)
    # Qwen3-style content with an inline think block renders the same
    inline = tokenizer.apply_chat_template(MSG + [{"role": "assistant", "content": f"<think>{thinking}</think>\n\n15"}],
                                           tokenize=False, **kw)
    assert inline == full


def test_thinking_token_count_on_ids(tokenizer):
    s, e = think_token_ids(tokenizer)
    ids = tokenizer("7+3=10\n10*2=20</think>\n\n20<|im_end|>", add_special_tokens=False)["input_ids"]
    n, closed = count_think_tokens_ids(ids, s, e)
    # 7 | +3 | = | 10 | \n | 10 | *2 | = | 20
    assert closed and n == len(tokenizer("7+3=10\n10*2=20", add_special_tokens=False)["input_ids"]) == 9
    assert THINK_START in tokenizer.convert_ids_to_tokens([s]) and THINK_END in tokenizer.convert_ids_to_tokens([e])
    assert count_think_tokens_ids(ids[:3], s, e) == (3, False)


def test_saved_tokenizer_loads_with_plain_transformers(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for kw in ({}, {"thinking_budget": 0}, {"thinking_budget": 48}):
        assert render(again, **kw) == render(tokenizer, **kw)
    text = "<|im_start|>user\n1+2<|im_end|>"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_chat_template_check_names_what_a_foreign_template_lacks(tokenizer):
    import copy

    from posttrain.model import CheckpointError, check_chat_template

    check_chat_template(tokenizer, "embedded")  # posttrain's own template passes
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(CheckpointError, match="ckpt: its chat template does not write `thinking_budget` into the "
                                              "prompt and does not end the generation prompt with `<think>`"):
        check_chat_template(plain, "ckpt")
    plain.chat_template = None
    with pytest.raises(CheckpointError, match="ckpt: the tokenizer has no chat template"):
        check_chat_template(plain, "ckpt")
    from transformers import AddedToken

    special = copy.deepcopy(tokenizer)  # decoding with skip_special_tokens (as generation does) would drop </think>
    special.add_tokens([AddedToken("</think>", special=True, normalized=False)], special_tokens=True)
    with pytest.raises(CheckpointError, match="marks `</think>` as a special token, which decoding drops"):
        check_chat_template(special, "ckpt")
