"""Reading recipes: safe YAML, dotted overrides, and one clear message per mistake.

An error names the key path (`sft.lora.r`), what was expected and, for a misspelt key, the nearest valid key.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, Tag, ValidationError

from posttrain.config import RecipeConfig


class _Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` with YAML 1.2 booleans: only true/false (any case). YAML 1.1 also reads on/off/yes/no
    as booleans, which would turn a reward's `on: auto` key into `True:`."""


_Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def safe_load(text: str):
    """Parse recipe YAML safely (no Python objects) with YAML 1.2 booleans."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


class RecipeError(ValueError):
    """A recipe that cannot run; str(e) is the whole user-facing message."""


def _models_in(ann) -> list[type[BaseModel]]:
    """The recipe sections an annotation can hold: the class itself, or those inside list[...], unions, Annotated."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [m for a in get_args(ann) for m in _models_in(a)]


def _tags_in(ann) -> set[str]:
    """The branch tags of the discriminated unions an annotation holds (`int`, `auto`, `range` of a budget)."""
    tags = {m.tag for m in getattr(ann, "__metadata__", ()) if isinstance(m, Tag)}
    return tags.union(*(_tags_in(a) for a in get_args(ann)))


def _walk(model: type[BaseModel], loc: tuple) -> tuple[tuple, list[type[BaseModel]]]:
    """`loc` without the parts pydantic adds for unions (branch tags such as `range` or `int`), and the sections
    the cleaned location ends in."""
    kept, models, tags = [], [model], set()
    for part in loc:
        if isinstance(part, int):
            kept.append(part)
            continue
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        if fields:
            kept.append(part)
            models, tags = _models_in(fields[0].annotation), _tags_in(fields[0].annotation)
        elif not models and part not in tags:  # inside a plain value (a dict key): keep it as given
            kept.append(part)
    return tuple(kept), models


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Valid keys of the section addressed by `loc` (the error's location minus the bad key)."""
    _, models = _walk(model, loc)
    return list(models[0].model_fields) if models else None


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        if e["type"] == "extra_forbidden":
            loc = _walk(RecipeConfig, tuple(e["loc"])[:-1])[0] + tuple(e["loc"])[-1:]
        else:
            loc = _walk(RecipeConfig, tuple(e["loc"]))[0]
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _fields_at(RecipeConfig, loc[:-1]) or []
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{'.'.join(str(p) for p in loc[:-1] + (near[0],))}'?" if near else ""
            lines.append(f"  {path}: unknown key{hint} (valid keys here: {', '.join(valid)})")
        elif e["type"] == "literal_error":
            allowed = re.findall(r"'([^']*)'", e.get("ctx", {}).get("expected", ""))
            near = difflib.get_close_matches(str(e["input"]), allowed, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            lines.append(f"  {path}: {e['msg']} (got {e['input']!r}){hint}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            m = re.match(r"^([\w.]+): ", msg)  # a message that names its key (`distill.teacher: ...`)
            if m and m.group(1).split(".")[0] in (_fields_at(RecipeConfig, loc) or []):
                path, msg = f"{path}.{m.group(1)}" if loc else m.group(1), msg[m.end():]
            got = "" if isinstance(e.get("input"), dict) else f" (got {e.get('input')!r})"
            lines.append(f"  {path}: {msg}{got}")
    return "\n".join(lines)


def apply_override(data: dict, dotted: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (`3`, `true`, `[0, 16]`)."""
    if "=" not in dotted:
        raise RecipeError(f"override {dotted!r} is not of the form key.path=value")
    key, raw = dotted.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"override {dotted!r} has an empty key")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise RecipeError(f"override {dotted!r}: {p!r} is not a section")
        node = nxt
    try:
        node[parts[-1]] = safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        reason = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"override {dotted!r}: the value {raw!r} is not valid YAML ({reason})") from None


def read_recipe_file(path: Path) -> dict:
    """The mapping a recipe file holds; a missing, unreadable, empty (nothing but comments) or non-mapping file is
    a `RecipeError`. An empty file is refused rather than read as "all defaults", which would run the default
    stages into the default run directory."""
    source = str(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {source!r} does not exist")
    try:
        data = safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe {source} cannot be read: {e}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {source} is not valid YAML: {e}") from None
    if data is None:
        raise RecipeError(f"recipe {source} is empty")
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {source} must be a mapping of keys, got {type(data).__name__}")
    return data


def load_recipe(path: str | Path | None, overrides: list[str] | tuple = ()) -> RecipeConfig:
    """Parse and validate a recipe file (or only overrides when `path` is None)."""
    data: Any = {}
    source = "(overrides)"
    if path is not None:
        source = str(path)
        data = read_recipe_file(Path(path))
    for o in overrides:
        apply_override(data, o)
    try:
        return RecipeConfig.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, source)) from None


def dump_recipe(cfg: RecipeConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
