"""Checks of a reasoning-gym recipe that run when it loads (`DataConfig`), apart from the task (`tasks.gym`), which
reads rows through `posttrain.data`: the schema imports this, never that."""

from __future__ import annotations

INSTALL_HINT = "pip install 'posttrain[reasoning-gym]' (or: pip install reasoning-gym)"


def import_gym():
    try:
        import reasoning_gym
    except ImportError:
        raise ValueError(f"data.source: reasoning_gym needs the reasoning-gym package: {INSTALL_HINT}") from None
    return reasoning_gym


def check_dataset(name: str | None, config: dict) -> None:
    """Raise ValueError naming the key when `data.dataset` or `data.config` is not one reasoning-gym accepts."""
    gym = import_gym()
    from reasoning_gym.factory import DATASETS

    if not name:
        raise ValueError("data.dataset: the reasoning-gym dataset to use is required (e.g. chain_sum)")
    if name not in DATASETS:
        import difflib

        close = difflib.get_close_matches(name, sorted(DATASETS), n=3)
        raise ValueError(f"data.dataset: {name!r} is not a reasoning-gym dataset"
                         + (f" (did you mean {', '.join(close)}?)" if close else f"; known: {', '.join(sorted(DATASETS))}"))
    try:
        gym.create_dataset(name, size=1, seed=0, **config)
    except TypeError as e:
        raise ValueError(f"data.config: {name}: {e}") from None
    except (AssertionError, ValueError) as e:
        raise ValueError(f"data.config: {name}: {e or 'the config is refused'}") from None
