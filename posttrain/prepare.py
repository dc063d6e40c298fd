"""`posttrain prepare SRC --out DST`: make a local HF checkpoint usable by posttrain's stages.

The stages put a thinking budget into the prompt through the chat template and count thinking tokens between
`<think>` and `</think>` (`model.check_chat_template`). Most checkpoints' own templates take no budget (Qwen3's
has `<think>` but no `thinking_budget`), and many tokenizers have no think tokens. `prepare_checkpoint` writes a
copy of SRC with posttrain's template (`posttrain/chat_template.jinja`) and, where missing, the `<think>`,
`</think>`, `<|im_start|>` and `<|im_end|>` tokens. New token rows of the input and output embeddings start at
the mean of the existing rows (the usual initialisation for added tokens); the embeddings grow only when the
matrix has no spare rows for them. Pickled weights (with `allow_pickle`) are converted to safetensors; other
pickles (training_args.bin, ...) are left behind. SRC is never changed; DST is written atomically with a checksum
manifest and a `prepare.json` that records what changed. It also prints which MoE features posttrain supports
for the checkpoint's router (`posttrain.moe.moe_features`: router metrics, `routing_replay`, `router_aux_coef`),
read from config.json alone, and records them in prepare.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from posttrain.model import (CheckpointError, check_chat_template, check_checkpoint_dir, check_files_complete,
                             load_model, open_tokenizer, read_json_file, replace_refusal, fsync_files,
                             save_model_files, write_dir_atomically, write_manifest)
from posttrain.tokenizer import EOS, IM_START, THINK_TOKENS, chat_template

_WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt", "merges.txt",
                    "tokenizer.model", "spiece.model", "*.tiktoken")
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")  # e.g. training_args.bin: never carried into the copy


def missing_tokens(tokenizer) -> list[str]:
    """The think and ChatML tokens posttrain's template writes that `tokenizer` does not have as one token."""
    out = []
    for t in [*THINK_TOKENS, IM_START, EOS]:
        i = tokenizer.convert_tokens_to_ids(t)
        if i is None or i == tokenizer.unk_token_id or tokenizer(t, add_special_tokens=False)["input_ids"] != [i]:
            out.append(t)
    return out


def check_out_dir(out: Path, src: Path) -> None:
    """`out` may be new, empty or an earlier `prepare` output (its prepare.json), and must be neither `src`, nor
    above it, nor inside it (SRC is never changed)."""
    o, s = out.resolve(), src.resolve()
    if o == s or o in s.parents or s in o.parents:
        raise CheckpointError(f"--out {out}: is, holds or lies inside the source checkpoint {src}; choose another "
                              "directory")
    problem = replace_refusal(out, "prepare.json", "`posttrain prepare` output")
    if problem:
        raise CheckpointError(f"--out {out}: {problem}")


def set_mean_rows(weight, new_ids: list[int], n_old: int) -> None:
    """Rows `new_ids` of an embedding-like (vocab, hidden) matrix := the mean of its first `n_old` rows."""
    import torch

    with torch.no_grad():
        weight[new_ids] = weight[:n_old].float().mean(0, keepdim=True).to(weight.dtype)


def report_moe_features(path: str | Path) -> dict:
    """Print which MoE features posttrain supports for checkpoint `path` (config.json only) and return them."""
    from posttrain.moe import format_moe_features, moe_features

    features = moe_features(Path(path))
    print(format_moe_features(features))
    return features


def prepare_checkpoint(src: str | Path, out: str | Path, trust_remote_code: bool = False,
                       allow_pickle: bool = False) -> dict | None:
    """Write `src` with posttrain's chat template and think tokens to `out`; returns the report written to
    `out/prepare.json`, or None (nothing written) when `src` is ready as it is. Prints the checkpoint's MoE
    features either way (`report_moe_features`)."""
    from transformers import AddedToken

    src, out = check_checkpoint_dir(src, allow_pickle), Path(out)  # a damaged source stops here: nothing written
    check_out_dir(out, src)
    features = report_moe_features(src)
    # not `load_tokenizer`: its pad default (pad = eos) would be saved into the copy as if the source had it
    tok = open_tokenizer(src, trust_remote_code)
    pickled = not (any(src.glob("*.safetensors")) or (src / "model.safetensors.index.json").is_file())
    try:
        check_chat_template(tok, src)
        if not missing_tokens(tok) and not pickled:
            return None
    except CheckpointError:
        pass
    added = missing_tokens(tok)
    n_old = len(tok)
    # think tokens are plain added tokens (decoding keeps them, as the embedded tokenizer does); ChatML ones special
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added if t in THINK_TOKENS])
    chatml = [t for t in added if t not in THINK_TOKENS]
    if chatml:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in chatml], special_tokens=True)
    tok.chat_template = chat_template()
    check_chat_template(tok, out)  # the template and tokens now agree
    ids = {t: tok.convert_tokens_to_ids(t) for t in added}
    report = {"source": str(src.resolve()), "chat_template": "posttrain", "added_tokens": added,
              "added_token_ids": ids,
              # ids past the old vocabulary get fresh rows (the mean of the others); an id the vocabulary already
              # had (a token it knew but split when reading text) keeps its row
              "initialised_token_ids": sorted(i for i in ids.values() if i >= n_old),
              "weights": "converted to safetensors" if pickled else "unchanged", "moe_features": features}
    if report["initialised_token_ids"]:
        report["weights"] += ", new embedding rows"

    def fill(tmp: Path) -> None:
        for f in src.iterdir():  # config, modelling code, generation config, README: not weights, tokenizer, pickles
            if f.is_file() and not any(f.match(p) for p in (*_WEIGHT_FILES, *_TOKENIZER_FILES, *_PICKLES,
                                                            "manifest.json")):
                shutil.copy2(f, tmp / f.name)
        new_ids = report["initialised_token_ids"]
        if new_ids or pickled:
            model = load_model(src, "cpu", "auto", trust_remote_code, allow_pickle)
            rows = model.get_input_embeddings().weight.shape[0]
            if new_ids and max(new_ids) >= rows:
                model.resize_token_embeddings(max(new_ids) + 1, mean_resizing=False)
            if new_ids:
                set_mean_rows(model.get_input_embeddings().weight, new_ids, n_old)
                head = model.get_output_embeddings()
                if head is not None and head.weight is not model.get_input_embeddings().weight:
                    set_mean_rows(head.weight, new_ids, n_old)
            report["embedding_rows"] = [rows, model.get_input_embeddings().weight.shape[0]]
            (tmp / "prepare.json").write_text(json.dumps(report, indent=2) + "\n")
            save_model_files(model, tok, tmp)  # safetensors; the manifest covers prepare.json too
        else:  # the weights are unchanged: copied byte for byte
            for f in src.iterdir():
                if f.is_file() and any(f.match(p) for p in _WEIGHT_FILES):
                    shutil.copy2(f, tmp / f.name)
            (tmp / "prepare.json").write_text(json.dumps(report, indent=2) + "\n")
            tok.save_pretrained(tmp)
            write_manifest(tmp)
            fsync_files(tmp)
        check_files_complete(tmp, hashes=False)  # the copy's weights are whole before it replaces `out`

    write_dir_atomically(out, fill)  # a fill that fails leaves no temporary copy and `out` as it was
    return report


def embedding_module_names(model_path, trust_remote_code: bool = False) -> list[str]:
    """Short names (PEFT matches `modules_to_save` by suffix) of the checkpoint's input embedding and, unless tied
    to it, its output head: `["embed_tokens", "lm_head"]` for most causal LMs. Built on the meta device from the
    config alone, so no weights are read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    return [names[id(inp)]] + ([names[id(out)]] if out is not None and out.weight is not inp.weight else [])


def check_added_tokens(model_path, lora, key: str = "sft.lora", trust_remote_code: bool = False) -> None:
    """A checkpoint `posttrain prepare` added tokens to (its prepare.json) has their embedding rows at the mean of
    the others. LoRA freezes the embeddings, and TRL's fused LM head bypasses PEFT's trainable-token rows, so LoRA
    training on it (SFT, or RL with `key` its lora section, a `LoraConfig`) must train the embedding and the head
    whole (`modules_to_save`); otherwise it is refused rather than leaving `</think>` untrained."""
    from posttrain.recipe import RecipeError

    f = Path(model_path) / "prepare.json"
    report = read_json_file(f, "`posttrain prepare` report") if f.is_file() else {}
    fresh = [t for t, i in report.get("added_token_ids", {}).items() if i in report.get("initialised_token_ids", [])]
    if not (lora.enabled and fresh):
        return
    need = embedding_module_names(model_path, trust_remote_code)
    if not all(any(m == n or m.endswith("." + n) for m in lora.modules_to_save) for n in need):
        raise RecipeError(f"{key}.enabled: {model_path} has tokens `posttrain prepare` added ({', '.join(fresh)}), "
                          f"whose embeddings are untrained and which LoRA alone cannot train; add "
                          f"{key}.modules_to_save: [{', '.join(need)}] (trained whole, stored beside the adapter), "
                          f"set {key}.enabled: false, or run a full `sft` stage first (it learns them; later stages "
                          "may then use LoRA)")
