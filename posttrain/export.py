"""`posttrain export`: ship a trained model as a standard PEFT LoRA adapter (or a merged HF checkpoint).

- LoRA-trained runs: the trained adapter itself (`<run>/sft/adapter`), re-saved with its base path.
- Full fine-tunes: an adapter extracted from the weight difference by truncated SVD per target matrix
  (Eckart-Young: the best rank-r approximation in Frobenius norm), fused 3-D expert tensors included (one
  rank-r factorisation per expert, laid out as PEFT's `target_parameters` wrapper expects). The layout is
  checked, not assumed: every module's delta is read back through PEFT's own `get_delta_weight` and compared
  with the true difference, which is the reported relative Frobenius error.

The embedding and output-head rows training changed (above all those of the tokens `posttrain prepare` added, which
start at the mean of the others) are carried by default (`carry_embeddings`): only the changed rows, as PEFT's
`trainable_token_indices`, while they are at most `ROWS_LIMIT` of the vocabulary, else the module whole
(`modules_to_save`); a head tied to the embedding follows it (PEFT re-ties it on loading). The changed small tensors
a low-rank delta cannot express (norm weights, biases, a router's bias) are carried too (`carry_small_tensors`):
their modules stored whole, under names that match exactly those modules (`posttrain.export_carry`).

The adapter is then checked as a user gets it (`posttrain.export_check`): saved, loaded by plain
`PeftModel.from_pretrained` on a fresh copy of the base, and compared with the fine-tuned model by the mean per-token
KL(fine-tuned || base + adapter) on held-out prompts. Above `max_kl` (nats per token, `DEFAULT_MAX_KL`) the export
raises `LossyExport` and writes nothing, unless `allow_lossy`. The report lists changed parameters the adapter does
not cover (attention sinks, fused experts' biases, ...).
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import torch

from posttrain.export_carry import frozen_linear_carriers, moved_buffer_owners, small_tensor_carriers
from posttrain.export_check import check_reloaded, heldout_batch, lossy_message
from posttrain.runlog import log, write_json_atomic


DEFAULT_MAX_KL = 0.1  # nats/token: good adapters measure 0.002-0.06, one that drops the added tokens' rows 3.9
ROWS_LIMIT = 0.25  # changed rows carried one by one up to this share of the vocabulary; above it, the module whole


class ExportError(ValueError):
    """Bad export input; the message names the path and what was looked for."""


class LossyExport(ExportError):
    """The adapter, loaded in plain PEFT, is further from the fine-tuned model than `max_kl` allows."""


def resolve_run(model: str | Path) -> tuple[Path, Path | None, Path | None]:
    """(fine-tuned checkpoint, base checkpoint or None, LoRA adapter or None) for `model`:

    - a run directory (recipe.yaml): its latest trained model, the last stage of the recipe's order that finished
      with a checkpoint (grpo/ppo after sft; the `export` stage and `posttrain sweep` pick the same one);
    - a checkpoint (config.json), inside a run directory or not (inside one, the run gives the base);
    - a PEFT adapter directory (adapter_config.json), e.g. an earlier export: re-shipped as it is.
    A stage trained with LoRA gives its trained adapter (`<stage>/adapter`) beside its checkpoint
    (`trained_adapter`); an export written there is never taken for it."""
    from posttrain.runlog import latest_checkpoint

    path = Path(model).expanduser()
    if (path / "recipe.yaml").is_file():
        run = path
        try:
            found = latest_checkpoint(run, skip=("base",))
        except FileNotFoundError as e:
            raise ExportError(str(e)) from None
        if found is None:
            raise ExportError(f"--model {path}: the run has no finished stage with a trained checkpoint "
                              "(sft, grpo or ppo: <stage>/done.json and <stage>/checkpoint/config.json)")
        ckpt = found[1]
    elif (path / "config.json").is_file():
        ckpt = path
        run = path.parent.parent if (path.parent.parent / "recipe.yaml").is_file() else None
    elif (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        base = Path(base).expanduser() if base else None
        return path, base, path
    else:
        raise ExportError(f"--model {path}: neither a run directory (recipe.yaml), a checkpoint (config.json) nor "
                          "a PEFT adapter (adapter_config.json)")
    adapter = trained_adapter(ckpt)
    if run is None:
        return ckpt, None, adapter
    base = run / "base" / "checkpoint"
    if not (base / "config.json").is_file():
        import yaml

        base_path = (yaml.safe_load((run / "recipe.yaml").read_text()) or {}).get("model", {}).get("path")
        base = Path(base_path).expanduser() if base_path else None
    return ckpt, base, adapter


def trained_adapter(ckpt: Path) -> Path | None:
    """The adapter LoRA training saved beside `ckpt` (`<stage>/adapter`, which the stage's done.json records as
    `adapter`), or None. Export output (its export.json), wherever written, is not one, and neither is an `adapter`
    folder of a stage whose done.json records none (a full fine-tune)."""
    from posttrain.runlog import read_json

    adapter, done = ckpt.parent / "adapter", ckpt.parent / "done.json"
    if not (adapter / "adapter_config.json").is_file() or (adapter / "export.json").is_file():
        return None
    if done.is_file() and not read_json(done, f"that stage {ckpt.parent.name} finished").get("adapter"):
        return None
    return adapter


def check_out_dir(out: Path, *keep: Path | None) -> None:
    """`out` may be replaced only when it is new, empty or an earlier export (its export.json), and holds none of
    the inputs (`keep`); anything else there is the user's, and the export stops rather than delete it."""
    from posttrain.model import replace_refusal

    for k in keep:
        if out.exists() and k is not None and (k.resolve() == out.resolve() or out.resolve() in k.resolve().parents):
            raise ExportError(f"--out {out}: holds the input {k}; choose another output directory")
    problem = replace_refusal(out, "export.json", "export")
    if problem:
        raise ExportError(f"--out {out}: {problem}")


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B (o, r), A (r, i) with B @ A the best rank-`rank` approximation of `delta` (o, i)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]).float(), vh[:r].float()


def _fill_linear(layer, adapter: str, delta: torch.Tensor, rank: int) -> None:
    b, a = svd_factors(delta, rank)
    scale = layer.scaling[adapter]
    wa, wb = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    wa.data.zero_()
    wb.data.zero_()
    wa.data[: a.shape[0]] = a
    wb.data[:, : b.shape[1]] = b / scale


def _fill_experts(layer, adapter: str, delta: torch.Tensor, rank: int) -> None:
    """delta (E, d1, d2) in the parameter's layout. PEFT's ParamWrapper computes, per expert e,
    delta[e] = B_e @ A_e (swapped in/out features) or its transpose, with A_e = lora_A[e*r:(e+1)*r] and
    B_e[:, k] = lora_B[:, k*E + e] (see peft.tuners.lora.layer.ParamWrapper.get_delta_weight)."""
    n_exp, r_full = delta.shape[0], layer.r[adapter]
    scale = layer.scaling[adapter]
    wa, wb = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    wa.data.zero_()
    wb.data.zero_()
    swapped = getattr(layer, "_did_swap_in_out_features", False)
    for e in range(n_exp):
        m = delta[e] if swapped else delta[e].T
        b, a = svd_factors(m, rank)
        k = a.shape[0]
        wa.data[e * r_full : e * r_full + k] = a
        wb.data[:, torch.arange(k) * n_exp + e] = b / scale


def changed_embeddings(base_model, tuned_model, modules_to_save=()) -> tuple[dict[str, list[int]], list[str]]:
    """What carries the rows training changed in the input embedding and (unless tied to it) the output head:
    ({short name: changed row ids} for PEFT `trainable_token_indices`, [short names to store whole]). A layer is
    stored whole when more than `ROWS_LIMIT` of its rows changed (full SFT moves every row of a head) or when it is
    not a plain bias-free Embedding/Linear; a layer `modules_to_save` already names is left to it."""
    from torch import nn

    inp, out = base_model.get_input_embeddings(), base_model.get_output_embeddings()
    names = {id(m): n for n, m in base_model.named_modules()}
    tuned = tuned_model.state_dict()
    rows, whole = {}, []
    tied = out is not None and out.weight is inp.weight
    for layer in [inp] + ([out] if out is not None and not tied else []):
        full = names[id(layer)]
        short = full.rsplit(".", 1)[-1]
        sharing = [full] + ([names[id(out)]] if tied else [])  # a tied head is the embedding
        if any(n.endswith(m) for n in sharing for m in modules_to_save):  # PEFT's suffix match
            continue
        new = tuned[f"{full}.weight"].detach()
        if new.shape != layer.weight.shape:
            raise ExportError(f"{full}.weight: {tuple(new.shape)} in the fine-tuned model, {tuple(layer.weight.shape)} "
                              "in the base; export against the checkpoint training started from (--base)")
        changed = (new.to(layer.weight.dtype) != layer.weight).any(-1).nonzero().flatten().tolist()
        if not changed:
            continue
        plain = isinstance(layer, (nn.Embedding, nn.Linear)) and getattr(layer, "bias", None) is None
        if plain and len(changed) <= ROWS_LIMIT * new.shape[0]:
            rows[short] = changed
        else:
            whole.append(short)
    return rows, whole


def _fill_token_rows(peft_model, tuned_state) -> set[str]:
    """Set every `trainable_token_indices` layer's rows to the fine-tuned ones; returns the parameters covered (a
    head tied to the embedding shares its rows, so its name is covered too)."""
    from peft.utils.other import TrainableTokensWrapper

    covered = set()
    for name, module in peft_model.named_modules():
        if not isinstance(module, TrainableTokensWrapper):
            continue
        adapter = module.token_adapter
        pname = f"{name.removeprefix('base_model.model.')}.weight"
        covered.add(pname)
        if adapter.tied_adapter is not None or "default" not in adapter.trainable_tokens_delta:
            continue
        delta = adapter.trainable_tokens_delta["default"]
        with torch.no_grad():
            delta.copy_(tuned_state[pname][adapter.token_indices["default"]].to(delta.dtype))
    return covered


def extract_adapter(base_model, tuned_model, rank: int, target_modules: list[str], target_parameters: list[str],
                    modules_to_save: list[str] = (), token_rows: dict[str, list[int]] | None = None,
                    lora_bias: bool = False):
    """A PeftModel on `base_model` whose LoRA deltas approximate tuned - base; returns (peft_model, errors,
    uncovered). Modules named by `modules_to_save` (name suffixes, PEFT's `modules_to_save`: norms, the embedding)
    are stored whole, with the tuned weights, so their change is carried exactly; `token_rows` ({embedding or head
    short name: row ids}, PEFT's `trainable_token_indices`) carries those rows with their tuned values; with
    `lora_bias` the LoRA-targeted linear layers' biases go with the adapter (PEFT `bias="lora_only"`), tuned."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    from posttrain.model import saves_tied_embedding
    from peft.utils import ModulesToSaveWrapper

    tuned, tuned_state = dict(tuned_model.named_parameters()), tuned_model.state_dict()
    base_params = {n: p.detach().clone() for n, p in base_model.named_parameters()}
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=target_modules or None,
                     target_parameters=target_parameters or None, init_lora_weights=False, task_type="CAUSAL_LM",
                     modules_to_save=list(modules_to_save) or None, trainable_token_indices=token_rows or None,
                     ensure_weight_tying=saves_tied_embedding(base_model, modules_to_save),
                     bias="lora_only" if lora_bias else "none")
    peft_model = get_peft_model(base_model, cfg)
    errors, covered = {}, _fill_token_rows(peft_model, tuned_state)
    for name, module in peft_model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and "default" in module.modules_to_save:
            prefix = name.removeprefix("base_model.model.")
            with torch.no_grad():
                whole = module.modules_to_save["default"]
                for pn, p in [*whole.named_parameters(), *whole.named_buffers()]:  # buffers: moved router biases
                    if f"{prefix}.{pn}" not in tuned_state:  # a non-persistent buffer (rotary tables): as it is
                        continue
                    p.copy_(tuned_state[f"{prefix}.{pn}"].detach().to(p.dtype))  # state_dict: tied names too
                    covered.add(f"{prefix}.{pn}")
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        pname = name.removeprefix("base_model.model.")
        if isinstance(module, ParamWrapper):
            pname = f"{pname}.{module.parameter_name}"
            pname = pname.replace(".base_layer", "")
            fill = _fill_experts if base_params[pname].ndim == 3 else _fill_linear
        else:
            bias = getattr(module.get_base_layer(), "bias", None)
            if lora_bias and bias is not None:  # saved with the adapter: the tuned bias, changed or not
                with torch.no_grad():
                    bias.copy_(tuned_state[f"{pname}.bias"].detach().to(bias.dtype))
                covered.add(f"{pname}.bias")
            pname = f"{pname}.weight"
            fill = _fill_linear
        delta = (tuned[pname].detach().float() - base_params[pname].float())
        with torch.no_grad():
            fill(module, "default", delta, rank)
            got = module.get_delta_weight("default").float()
        norm = delta.norm().item()
        errors[pname] = (got - delta).norm().item() / norm if norm > 0 else (got.norm().item() and float("inf"))
        covered.add(pname)
    uncovered = {}
    for n, p in base_params.items():
        if n in covered or n not in tuned:
            continue
        change = (tuned[n].detach().float() - p.float()).norm().item()
        if change > 0:
            # relative to the larger of the two norms: a zero-initialised bias gives 1.0, not change / 1e-12
            uncovered[n] = change / max(p.float().norm().item(), tuned[n].detach().float().norm().item(), 1e-12)
    return peft_model, errors, uncovered


def export(model: str | Path, out: str | Path, merged: bool = False, rank: int = 16, base: str | Path | None = None,
           target_modules: tuple[str, ...] | None = None, target_parameters: tuple[str, ...] | None = None,
           modules_to_save: tuple[str, ...] = (), trust_remote_code: bool = False, allow_pickle: bool = False,
           carry_embeddings: bool = True, carry_small_tensors: bool = True, max_kl: float = DEFAULT_MAX_KL,
           allow_lossy: bool = False, probe_prompts: list[str] | None = None) -> dict:
    """Write the adapter (or merged checkpoint) and tokenizer to `out`; returns the report (also export.json).
    `probe_prompts`: the prompts the KL check is measured on (default: embedded-task problems).
    `target_modules` / `target_parameters` of an extracted adapter: None for the family's (`export_targets`); an
    explicit entry that matches nothing in the model is an `ExportError` naming `export.target_modules`.
    An extracted adapter further than `max_kl` from the fine-tuned model raises `LossyExport` (nothing written)
    unless `allow_lossy`."""
    from posttrain.model import load_model, save_model_files, write_dir_atomically

    load = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}  # the recipe's model.* flags
    if rank < 1:
        raise ExportError(f"--rank {rank}: must be a positive integer")
    ckpt, run_base, adapter = resolve_run(model)
    if base is not None:
        base = Path(base).expanduser()
        if not (base / "config.json").is_file():
            raise ExportError(f"--base {base}: not a checkpoint directory (no config.json)")
    else:
        base = run_base
    out = Path(out).expanduser()
    check_out_dir(out, ckpt, base, adapter)
    if merged:
        if ckpt == adapter:
            raise ExportError(f"--model {model}: an adapter; --merged needs a checkpoint")
        report = {"kind": "merged", "source": str(ckpt)}
        tuned, tok = load_model(ckpt, **load), _tokenizer(ckpt)

        def fill(tmp: Path) -> None:
            save_model_files(tuned, tok, tmp)
            write_json_atomic(tmp / "export.json", report)

        write_dir_atomically(out, fill)
    elif adapter is not None:
        tok = _tokenizer(ckpt)
        report = {"kind": "lora (trained)", "source": str(adapter)}

        def fill(tmp: Path) -> None:
            shutil.copytree(adapter, tmp, dirs_exist_ok=True)
            tok.save_pretrained(tmp)
            _absolute_base(tmp, base)
            report["base"] = _adapter_base(tmp)
            write_json_atomic(tmp / "export.json", report)

        write_dir_atomically(out, fill)
    else:
        if base is None or not (base / "config.json").is_file():
            raise ExportError(f"--model {model}: no base checkpoint to extract an adapter against "
                              f"(looked for {run_base or 'a run directory around the checkpoint'}); pass --base")
        tok = _tokenizer(ckpt)
        tuned, base_model = load_model(ckpt, **load), load_model(base, **load)
        mods, params = export_targets(base_model, target_modules, target_parameters)
        names = [n for n, _ in base_model.named_modules() if n]
        unknown = [m for m in modules_to_save if not any(n.endswith(m) for n in names)]  # PEFT's matching
        if unknown:
            near = sorted({n.split(".")[-1] for n in names if not n.split(".")[-1].isdigit()})
            raise ExportError(f"modules_to_save: no module of the model is named {', '.join(map(repr, unknown))} "
                              f"(module names end in one of: {', '.join(near)})")
        save = list(modules_to_save)
        tuned_state = tuned.state_dict()
        moved = moved_buffer_owners(base_model, tuned_state) if carry_small_tensors else []
        if moved:  # routers whose correction bias moved: stored whole (weight and bias), not LoRA-adapted
            routers = sorted({".".join(o.split(".")[-2:]) for o in moved})
            params = [p for p in params if p not in {f"{r}.weight" for r in routers}]
            save += [r for r in routers if r not in save]
            log.info("export: %d routers' correction biases moved in training: %s stored whole", len(moved),
                     ", ".join(routers))
        rows, whole = changed_embeddings(base_model, tuned, save) if carry_embeddings else ({}, [])
        if rows or whole:
            log.info("export: carrying the embedding rows training changed: %s",
                     ", ".join([f"{k} ({len(v)} rows)" for k, v in rows.items()] + [f"{k} (whole)" for k in whole]))
        small, lora_bias = (small_tensor_carriers(base_model, tuned_state, mods, params, save + whole)
                            if carry_small_tensors else ([], False))
        if small or lora_bias:
            log.info("export: carrying the small tensors training changed: %s",
                     ", ".join([f"{m} (whole)" for m in small] + ["the LoRA layers' biases"] * lora_bias))
        frozen = (frozen_linear_carriers(base_model, tuned_state, mods, save + whole + small)
                  if carry_small_tensors else [])
        if frozen:
            size = sum(p.numel() for n, p in base_model.named_parameters()
                       if any(f".{m}." in f".{n}" for m in frozen))
            log.info("export: storing whole the layers training changed that PEFT cannot adapt for %s: %s (%.2fM "
                     "parameters)", base_model.config.model_type, ", ".join(frozen), size / 1e6)
            small = [*small, *frozen]
        largest = max([min(p.shape[-2:]) for n, p in base_model.named_parameters()
                       if any(n.endswith(f"{m}.weight") for m in mods) or any(n.endswith(q) for q in params)] or [rank])
        if rank > largest:
            log.warning("export: rank %d exceeds the largest target matrix's rank %d; using %d", rank, largest, largest)
        requested, rank = rank, min(rank, largest)
        peft_model, errors, uncovered = extract_adapter(base_model, tuned, rank, mods, params, save + whole + small,
                                                        rows, lora_bias)
        peft_model.peft_config["default"].base_model_name_or_path = str(base.resolve())
        ids, mask = heldout_batch(tok, tuned, prompts=probe_prompts)
        worst = max(errors.values()) if errors else 0.0
        report = {"kind": "lora (extracted by SVD)", "source": str(ckpt), "base": str(base.resolve()), "rank": rank,
                  "relative_frobenius_error": errors, "max_relative_frobenius_error": worst,
                  "modules_to_save": save + whole + small, "lora_bias": lora_bias,
                  "trainable_token_rows": {k: len(v) for k, v in rows.items()}, "uncovered_changed_params": uncovered,
                  "max_kl": max_kl}
        if requested != rank:
            report["rank_requested"] = requested
        held = [peft_model]  # the only reference once saved: freed before the base is loaded again
        del peft_model, base_model

        def fill(tmp: Path) -> None:
            held.pop().save_pretrained(tmp, safe_serialization=True)
            gc.collect()  # PEFT's wrappers hold cycles: free the first base before check_reloaded loads another
            tok.save_pretrained(tmp)
            report["kl_tuned_vs_adapted"], report["kl_tuned_vs_base"] = check_reloaded(tmp, base, tuned, ids, mask,
                                                                                       load)
            report["lossy"] = report["kl_tuned_vs_adapted"] > max_kl
            if report["lossy"] and not allow_lossy:
                raise LossyExport(f"{lossy_message(report, max_kl)}. Nothing was written to {out}")
            if report["lossy"]:
                log.warning("export: %s (written: export.allow_lossy / --allow-lossy)", lossy_message(report, max_kl))
            write_json_atomic(tmp / "export.json", report)  # inside: an interrupted export leaves no stray dir

        write_dir_atomically(out, fill)
    log.info("export: %s -> %s", report["kind"], out)
    return report


def export_targets(model, target_modules=None, target_parameters=None) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) an extracted adapter covers on `model`. None stands for the family's LoRA
    targets (`moe_lora.family_lora_targets`: attention variants such as MLA, shared experts where PEFT allows, the
    fused experts) plus the softmax routers' `mlp.gate.weight`; an explicit entry that matches no module
    (parameter) of the model, or that PEFT would rewrite to the fused experts, is an ExportError naming the key."""
    from posttrain.moe_lora import check_targets, family_lora_targets, peft_matches

    fam_mods, fam_params = family_lora_targets(model)
    if any(peft_matches(n, "mlp.gate.weight") for n, _ in model.named_parameters()):
        fam_params = [*fam_params, "mlp.gate.weight"]
    out = []
    for field, asked, fam in (("target_modules", target_modules, fam_mods),
                              ("target_parameters", target_parameters, fam_params)):
        if asked is not None:
            try:
                check_targets(model, field, list(asked), fam, "export")
            except ValueError as e:
                raise ExportError(str(e)) from None
        out.append(list(fam if asked is None else asked))
    return out[0], out[1]


def _tokenizer(path: Path):
    from posttrain.model import load_tokenizer

    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise ExportError(f"--model {path}: no tokenizer there to ship beside the adapter ({e})") from None


def _absolute_base(adapter_dir: Path, base: Path | None) -> None:
    """Point the adapter at its base by absolute path, so it loads from any working directory; a recorded base
    that is no local directory (a hub id) is left as it is."""
    cfg_file = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    recorded = cfg.get("base_model_name_or_path") or ""
    if base is not None and (base / "config.json").is_file():
        cfg["base_model_name_or_path"] = str(base.resolve())
    elif recorded and Path(recorded).expanduser().is_dir():
        cfg["base_model_name_or_path"] = str(Path(recorded).expanduser().resolve())
    cfg_file.write_text(json.dumps(cfg, indent=2))


def _adapter_base(adapter_dir: Path) -> str | None:
    return json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
