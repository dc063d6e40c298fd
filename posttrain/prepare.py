"""`posttrain prepare SRC --out DST`: make a local HF checkpoint usable by posttrain's stages.

The stages put a thinking budget into the prompt through the chat template and count thinking tokens between
`<think>` and `</think>` (`model.check_chat_template`). Most checkpoints' own templates take no budget (Qwen3's
has `<think>` but no `thinking_budget`), and many tokenizers have no think tokens. `prepare_checkpoint` writes a
copy of SRC with posttrain's template (`posttrain/chat_template.jinja`) and, where missing, the `<think>`,
`</think>`, `<|im_start|>` and `<|im_end|>` tokens. New token rows of the input and output embeddings start at
the mean of the existing rows (the usual initialisation for added tokens); the embeddings grow only when the
matrix has no spare rows for them. SRC is never changed; DST is written atomically with a checksum manifest and a
`prepare.json` that records what changed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from posttrain.model import (CheckpointError, check_chat_template, check_checkpoint_dir, load_model, load_tokenizer,
                             save_model_files, write_dir_atomically, write_manifest)
from posttrain.tokenizer import EOS, IM_START, THINK_TOKENS, chat_template

_WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")


def missing_tokens(tokenizer) -> list[str]:
    """The think and ChatML tokens posttrain's template writes that `tokenizer` does not have as one token."""
    out = []
    for t in [*THINK_TOKENS, IM_START, EOS]:
        i = tokenizer.convert_tokens_to_ids(t)
        if i is None or i == tokenizer.unk_token_id or tokenizer(t, add_special_tokens=False)["input_ids"] != [i]:
            out.append(t)
    return out


def check_out_dir(out: Path, src: Path) -> None:
    """`out` may be new, empty or an earlier `prepare` output (its prepare.json), and must not be `src`."""
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise CheckpointError(f"--out {out}: holds the source checkpoint {src}; choose another directory")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not (out / "prepare.json").is_file():
        raise CheckpointError(f"--out {out}: exists, is not empty and is not an earlier `posttrain prepare` output (no "
                              "prepare.json); choose a new directory or empty it (nothing was written)")


def set_mean_rows(weight, new_ids: list[int], n_old: int) -> None:
    """Rows `new_ids` of an embedding-like (vocab, hidden) matrix := the mean of its first `n_old` rows."""
    import torch

    with torch.no_grad():
        weight[new_ids] = weight[:n_old].float().mean(0, keepdim=True).to(weight.dtype)


def prepare_checkpoint(src: str | Path, out: str | Path, trust_remote_code: bool = False,
                       allow_pickle: bool = False) -> dict | None:
    """Write `src` with posttrain's chat template and think tokens to `out`; returns the report written to
    `out/prepare.json`, or None (nothing written) when `src` is ready as it is."""
    from transformers import AddedToken

    src, out = check_checkpoint_dir(src, allow_pickle), Path(out)
    check_out_dir(out, src)
    tok = load_tokenizer(src, trust_remote_code)
    try:
        check_chat_template(tok, src)
        if not missing_tokens(tok):
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
    report = {"source": str(src.resolve()), "chat_template": "posttrain", "added_tokens": added,
              "added_token_ids": {t: tok.convert_tokens_to_ids(t) for t in added}}

    def fill(tmp: Path) -> None:
        for f in src.iterdir():  # modelling code, generation config, README...: everything but weights and tokenizer
            if f.is_file() and not any(f.match(p) for p in (*_WEIGHT_FILES, *_TOKENIZER_FILES, "manifest.json")):
                shutil.copy2(f, tmp / f.name)
        if added:
            model = load_model(src, "cpu", "auto", trust_remote_code, allow_pickle)
            rows = model.get_input_embeddings().weight.shape[0]
            if len(tok) > rows:
                model.resize_token_embeddings(len(tok), mean_resizing=False)
            new_ids = sorted(report["added_token_ids"].values())
            set_mean_rows(model.get_input_embeddings().weight, new_ids, n_old)
            head = model.get_output_embeddings()
            if head is not None and head.weight is not model.get_input_embeddings().weight:
                set_mean_rows(head.weight, new_ids, n_old)
            report["embedding_rows"] = [rows, model.get_input_embeddings().weight.shape[0]]
            (tmp / "prepare.json").write_text(json.dumps(report, indent=2) + "\n")
            save_model_files(model, tok, tmp)  # the manifest covers prepare.json too
        else:  # the weights are unchanged: copied byte for byte
            for f in src.iterdir():
                if f.is_file() and any(f.match(p) for p in _WEIGHT_FILES):
                    shutil.copy2(f, tmp / f.name)
            (tmp / "prepare.json").write_text(json.dumps(report, indent=2) + "\n")
            tok.save_pretrained(tmp)
            write_manifest(tmp)

    write_dir_atomically(out, fill)
    return report
