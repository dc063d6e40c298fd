"""Loading and saving MoE causal LMs: one code path for the embedded tiny model and any local HF checkpoint.

Security: weights are read from safetensors only (`use_safetensors=True`); a checkpoint that ships only pickled
weights (`pytorch_model.bin`) is refused unless the recipe sets `allow_pickle`, and then it loads through
`torch.load(weights_only=True)` (transformers' own path). Custom modelling code runs only with
`trust_remote_code`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Config attributes by which we recognise a Mixture-of-Experts model (Qwen2/3-MoE, Mixtral, OLMoE, DeepSeek, ...).
_MOE_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded safely; the message says which file and why."""


def default_experts_implementation(device: str | torch.device) -> str:
    """`grouped_mm` everywhere: `batched_mm` materialises per-token expert weights and exhausts CPU memory."""
    return "grouped_mm"


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available on this machine")
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """`manifest.json`: size and sha256 of every file, so a truncated or corrupted checkpoint is detected."""
    files = {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(directory.iterdir()) if f.is_file() and f.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_manifest(directory: Path, hashes: bool = True) -> list[str]:
    """Problems with `directory` against its manifest ([] when it matches or has no manifest)."""
    mf = directory / MANIFEST
    if not mf.is_file():
        return []
    try:
        files = json.loads(mf.read_text())["files"]
    except (ValueError, KeyError, TypeError):  # not UTF-8, not JSON, or no "files" object
        return [f"{mf} is unreadable"]
    problems = []
    for name, meta in files.items():
        f = directory / name
        if not f.is_file():
            problems.append(f"{f} is missing")
        elif f.stat().st_size != meta["size"]:
            problems.append(f"{f} is {f.stat().st_size} bytes, the manifest says {meta['size']} (truncated?)")
        elif hashes and _sha256(f) != meta["sha256"]:
            problems.append(f"{f} does not match its sha256 in the manifest (corrupted)")
    return problems


def check_checkpoint_dir(path: str | Path, allow_pickle: bool = False) -> Path:
    """Raise CheckpointError unless `path` is a loadable HF checkpoint with safetensors weights whose files
    match its manifest (when it has one)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model path {str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}/config.json is missing: not a Hugging Face checkpoint directory")
    read_json_file(path / "config.json", "checkpoint config")
    has_st = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    has_pickle = any(path.glob("pytorch_model*.bin"))
    if not has_st and has_pickle and not allow_pickle:
        raise CheckpointError(
            f"{path} holds only pickled weights (pytorch_model*.bin); pickle can run arbitrary code when loaded. "
            "Convert it to safetensors, or set `model.allow_pickle: true` in the recipe if you trust its source."
        )
    if not has_st and not has_pickle:
        raise CheckpointError(f"{path} has no weights (*.safetensors)")
    check_files_complete(path)
    return path


def check_files_complete(path: Path, hashes: bool = True) -> None:
    """Raise CheckpointError when checkpoint `path`'s files differ from its manifest (sizes, and with `hashes` their
    sha256) or a safetensors file is cut short or a listed shard missing (`safetensors_problems`)."""
    problems = verify_manifest(path, hashes) or safetensors_problems(path)
    if problems:
        raise CheckpointError(f"checkpoint {path} is damaged: " + "; ".join(problems))


def read_json_file(f: Path, what: str) -> dict:
    """The JSON object in `f`, or CheckpointError naming the file, the line and column (or byte offset) and why."""
    try:
        data = json.loads(f.read_bytes().decode("utf-8-sig"))
    except OSError as e:
        raise CheckpointError(f"{f}: cannot read the {what} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{f}: the {what} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at byte offset "
                              f"{e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: the {what} is not valid JSON at line {e.lineno}, column {e.colno} "
                              f"({e.msg})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{f}: the {what} is a JSON {type(data).__name__}, not an object")
    return data


def safetensors_problems(path: Path) -> list[str]:
    """Files of checkpoint `path` that are cut short or missing: every `*.safetensors` must be as long as its header
    says (a copy or download that stopped part-way is shorter), and every shard `model.safetensors.index.json` lists
    must exist. Reads only the headers."""
    problems = []
    shards = set()
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_file(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            return [f"{index} has no \"weight_map\" object"]
        shards = {str(v) for v in weight_map.values()}
        problems += [f"{path / s} is missing (listed in {index.name})" for s in sorted(shards)
                     if not (path / s).is_file()]
    for f in sorted(path.glob("*.safetensors")):
        why = _safetensors_problem(f)
        if why:
            problems.append(why)
    return problems


def _safetensors_problem(f: Path) -> str | None:
    """Why the safetensors file `f` is unusable (None when its length matches its header): an 8-byte little-endian
    header length, a JSON header of tensor byte ranges, then the tensor data."""
    import struct

    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{f} is {size} bytes, too short for a safetensors header (truncated?)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{f} is {size} bytes, shorter than its {n}-byte header says (truncated?)"
            if n > 100 * 2**20:
                return f"{f}: its header length {n} is implausible (not a safetensors file?)"
            header = json.loads(fh.read(n).decode("utf-8"))
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except OSError as e:
        return f"{f}: cannot read it ({e.strerror or e})"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):  # JSON, UTF-8 or layout of the header
        return f"{f}: its header is not a valid safetensors header (corrupted?)"
    want = 8 + n + end
    if size != want:
        return f"{f} is {size} bytes, its header says {want} ({'truncated' if size < want else 'corrupted'}?)"
    return None


def saves_tied_embedding(model, modules_to_save) -> bool:
    """Whether PEFT `modules_to_save` (name suffixes) names a module whose weight the input embedding and the output
    head share: then the saved copy must stay tied (`LoraConfig.ensure_weight_tying`), and only then (on an untied
    model some PEFT versions tie the head to the saved embedding)."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or out.weight is not inp.weight:
        return False
    ends = [n for n, m in model.named_modules() if m is inp or m is out]
    return any(n == m or n.endswith("." + m) for n in ends for m in modules_to_save)


def lora_targets(lora, model, key: str = "sft.lora") -> tuple[list[str], list[str]]:
    """The (target_modules, target_parameters) a recipe's `lora` section asks of `model`. A list left at its default
    (`LoraConfig`'s) stands for the family's targets (`family_lora_targets`); an explicit entry that matches no
    module (no parameter) of the model, or that PEFT would silently rewrite to the fused experts
    (`moe_lora.peft_remapped`), is a ValueError naming `{key}.target_modules` (`.target_parameters`)."""
    from posttrain.config_common import LoraConfig as RecipeLora
    from posttrain.moe_lora import check_targets, family_lora_targets

    out = []
    for field, fam in zip(("target_modules", "target_parameters"), family_lora_targets(model)):
        asked = list(getattr(lora, field))
        if asked == RecipeLora.model_fields[field].default_factory():
            out.append(fam)
            continue
        check_targets(model, field, asked, fam, key)
        out.append(asked)
    return out[0], out[1]


def peft_config(lora, model, key: str = "sft.lora"):
    """PEFT `LoraConfig` for a recipe `lora` section on `model`, with targets from `lora_targets`."""
    from peft import LoraConfig

    target_modules, targets = lora_targets(lora, model, key)
    if not target_modules and not targets:
        raise ValueError(f"{key}: no target_modules nor target_parameters: the adapter would train nothing")
    modules = [n for n, _ in model.named_modules()]
    missing = [m for m in lora.modules_to_save if not any(n == m or n.endswith("." + m) for n in modules)]
    if missing:
        raise ValueError(f"{key}.modules_to_save: {missing} names no module of this model (module names end in "
                         f"e.g. {sorted({n.rsplit('.', 1)[-1] for n in modules if n and not n[-1].isdigit()})[:8]})")
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                      target_modules=target_modules or None, target_parameters=targets or None,
                      modules_to_save=list(lora.modules_to_save) or None,
                      ensure_weight_tying=saves_tied_embedding(model, lora.modules_to_save))


def is_moe_config(config) -> bool:
    return any(getattr(config, k, None) for k in _MOE_EXPERT_KEYS)


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    experts_implementation: str | None = None,
    require_moe: bool = False,
    auto_class=None,
    **model_kwargs,
):
    """Load a model from a local HF directory (the embedded tiny model is just such a directory).

    `auto_class` defaults to `AutoModelForCausalLM`; reward models pass `AutoModelForSequenceClassification`
    (with e.g. `num_labels=1` in `model_kwargs`) and get the same safety rules.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = check_checkpoint_dir(path, allow_pickle)
    device = torch.device(device)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:  # e.g. an unknown model_type, a missing key
        raise CheckpointError(f"{path}/config.json: transformers cannot build a config from it: "
                              f"{_first_line(e)}") from None
    if require_moe and not is_moe_config(config):
        raise CheckpointError(f"{path}: {type(config).__name__} is not a Mixture-of-Experts config")
    kwargs = {}
    if is_moe_config(config):
        kwargs["experts_implementation"] = experts_implementation or default_experts_implementation(device)
    try:
        model = (auto_class or AutoModelForCausalLM).from_pretrained(
            path,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=not allow_pickle,
            **kwargs,
            **model_kwargs,
        )
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError, RuntimeError) as e:  # e.g. a tensor whose shape the config contradicts
        raise CheckpointError(f"{path}: transformers cannot load its weights: {_first_line(e)}") from None
    # Router logits are a training-time output (the load-balancing loss turns them on); left on, generation
    # computes the aux loss at every decode step against the full attention mask and fails.
    _router_logits_off(model)
    return model.to(device)


def _router_logits_off(model) -> None:
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is not None and hasattr(c, "output_router_logits"):
            c.output_router_logits = False


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer of `path` (pad = eos when it has no pad token). In a checkpoint directory (config.json) the
    config and the weight files' lengths are checked first, without hashing (`check_files_complete`): a stage reads
    its tokenizer before it starts any worker, and so stops at once on a damaged checkpoint."""
    if (Path(path) / "config.json").is_file():
        check_checkpoint_files(path)
    return open_tokenizer(path, trust_remote_code, pad_as_eos=True)


def check_checkpoint_files(path: str | Path) -> None:
    """The quick part of `check_checkpoint_dir`, for a driver before it starts workers that load `path`: its
    config.json is a JSON object and its weight files are as long as the manifest and their headers say (no
    hashing). Raises CheckpointError naming the file."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}/config.json is missing: not a Hugging Face checkpoint directory")
    read_json_file(path / "config.json", "checkpoint config")
    check_files_complete(path, hashes=False)


def open_tokenizer(path: str | Path, trust_remote_code: bool = False, pad_as_eos: bool = False):
    """`AutoTokenizer.from_pretrained(path)`, or CheckpointError naming the file (a tokenizer file that is not JSON)
    or the cause; with `pad_as_eos` a tokenizer without a pad token pads with eos."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a broken tokenizer.json
        for name in _TOKENIZER_JSON:  # name the file when one is not JSON
            if (Path(path) / name).is_file():
                read_json_file(Path(path) / name, "tokenizer file" if name != "config.json" else "checkpoint config")
        raise CheckpointError(f"{path}: cannot load its tokenizer: {_first_line(e)}") from None
    if pad_as_eos and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


_TOKENIZER_JSON = ("config.json", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json",
                   "added_tokens.json")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def check_chat_template(tokenizer, source) -> None:
    """Stages that put a thinking budget in the prompt need a chat template that takes `thinking_budget` (writing
    the number into the prompt) and ends the generation prompt with `<think>`, and a tokenizer with `<think>` and
    `</think>` tokens, as `posttrain/chat_template.jinja` does. Most checkpoints' own templates do neither: SFT would
    then train on prompts without their budget and on an unopened `</think>`. Raises CheckpointError naming `source`."""
    from posttrain.tokenizer import think_token_ids

    fix = (f"`posttrain prepare {source} --out DIR` writes a copy with posttrain's template and think tokens; use DIR "
           "as model.path")
    if not getattr(tokenizer, "chat_template", None):
        raise CheckpointError(f"{source}: the tokenizer has no chat template; posttrain's stages need one that takes "
                              f"`thinking_budget` and opens `<think>`: {fix}")
    msgs = [{"role": "user", "content": "1+1"}]
    try:
        auto = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        budgeted = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False,
                                                 thinking_budget=4321)
    except Exception as e:  # noqa: BLE001 - a template that fails to render is as unusable as none
        raise CheckpointError(f"{source}: its chat template does not render a user turn ({e}); {fix}") from None
    problems = []
    if "4321" not in budgeted or "4321" in auto:
        problems.append("does not write `thinking_budget` into the prompt")
    if not auto.rstrip().endswith("<think>") or not budgeted.rstrip().endswith("<think>"):
        problems.append("does not end the generation prompt with `<think>`")
    try:
        _, end = think_token_ids(tokenizer)
        if "</think>" not in tokenizer.decode([end], skip_special_tokens=True):  # the decoding generation uses
            problems.append("marks `</think>` as a special token, which decoding drops (answers would never be "
                            "graded as closed): set \"special\": false for <think> and </think> in its tokenizer.json")
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise CheckpointError(f"{source}: its chat template {' and '.join(problems)}; {fix}")


def replace_refusal(out: Path, marker: str, what: str) -> str | None:
    """Why a tool must not replace directory `out` with its output (None when it may: `out` is new, empty, or an
    earlier output of the tool, which holds `marker`). Anything else there is the user's, never deleted."""
    if not out.exists():
        return None
    if not out.is_dir():
        return "exists and is not a directory"
    if any(out.iterdir()) and not (out / marker).is_file():
        return (f"exists, is not empty and is not an earlier {what} (no {marker}); choose a new directory or empty it "
                "(nothing was written)")
    return None


def write_dir_atomically(out: str | Path, fill) -> Path:
    """Write a directory all or nothing: `fill(tmp)` fills a temporary sibling (`out.tmp`), which then replaces
    `out` by rename; a fill that fails part-way leaves the previous `out` as it was and the temporary removed (it
    would hold on to the space a full disk lacks). A failed write (full disk, quota, file-size limit) raises
    `runlog.SaveFailed`, naming `out`, the cause and the free space."""
    import shutil

    from posttrain.runlog import human_bytes, raise_save_failed, tree_size

    out = Path(out)
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
    except BaseException as e:
        written = tree_size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        raise_save_failed(e, f"{out} ({human_bytes(written)} written before it failed, then removed)", out.parent,
                          f"The previous {out} is intact" if out.exists() else f"Nothing was written to {out}")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out


def save_model_files(model, tokenizer, directory: Path) -> None:
    """`save_pretrained` (safetensors) of model and tokenizer into `directory`, a checksum manifest, every file
    fsynced; `save_model` does it in a temporary directory, `write_dir_atomically`'s fill."""
    _router_logits_off(model)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    write_manifest(directory)
    fsync_files(directory)


def fsync_files(directory: Path) -> None:
    """Flush every file of `directory` to disk (before the rename that publishes it)."""
    import os

    for f in directory.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """`save_pretrained` (safetensors) for model and tokenizer into `out_dir`, written atomically: everything
    goes to a temporary sibling directory (with a checksum manifest, every file fsynced), which is renamed into
    place at the end; a save that fails part-way leaves the previous checkpoint as it was."""
    return write_dir_atomically(out_dir, lambda tmp: save_model_files(model, tokenizer, tmp))


def tiny_moe_config(vocab_size: int, pad_id: int, eos_id: int, **overrides):
    """A Qwen3-MoE config of a few million parameters (hidden 128, 4 layers, 8 experts, top-2)."""
    from transformers import Qwen3MoeConfig

    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        router_aux_loss_coef=0.01,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
    )
    cfg.update(overrides)
    return Qwen3MoeConfig(**cfg)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_checkpoint(path: str | Path) -> dict:
    cfg = read_json_file(Path(path) / "config.json", "checkpoint config")
    return {k: cfg.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "num_experts", "vocab_size")}
