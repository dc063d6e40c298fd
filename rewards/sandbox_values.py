"""Values from the sandbox rebuilt in the trusted process: the inverse of the harness's `encode`
(`sandbox_bootstrap._make_encoder`), on data the code under test may have forged.

A tree is ``[tag, payload]``: "n" None, "b" bool, "i" int (decimal text), "f" float (repr), "c" complex ([re, im]),
"s" str, "y" bytes (hex), "l"/"t"/"S"/"F" list/tuple/set/frozenset (items), "d" dict ([[key, value], ...]).
"""

from __future__ import annotations

from .sandbox_bootstrap import MAX_DEPTH

MAX_DECODED_ITEMS = 1_000_000  # values per decoded result: a bigger one is refused, not built


def decode(tree, depth: int = 0, budget: list | None = None):
    """The value an `encode`d tree stands for, built from fresh builtins; ValueError for anything malformed.

    The trusted process builds it, so what the code chose must not cost it much: at most `MAX_DECODED_ITEMS`
    values, and a set or dict whose keys mostly share a hash (which would make building it quadratic) is refused.
    """
    budget = [MAX_DECODED_ITEMS] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError("value too large")
    if depth > MAX_DEPTH + 1 or type(tree) is not list or not tree or type(tree[0]) is not str:
        raise ValueError("malformed value")
    tag, rest = tree[0], tree[1:]
    if tag == "n" and not rest:
        return None
    if len(rest) != 1:
        raise ValueError("malformed value")
    (x,) = rest
    if tag == "b" and type(x) is bool:
        return x
    if tag == "i" and type(x) is str:
        return int(x)  # ValueError past Python's 4300-digit limit
    if tag == "f" and type(x) is str:
        return float(x)
    if tag == "c" and type(x) is list and len(x) == 2 and all(type(v) is str for v in x):
        return complex(float(x[0]), float(x[1]))
    if tag == "s" and type(x) is str:
        return x
    if tag == "y" and type(x) is str:
        return bytes.fromhex(x)
    if tag in ("l", "t", "S", "F") and type(x) is list:
        items = [decode(e, depth + 1, budget) for e in x]
        if tag in ("S", "F"):
            _check_hashes(items)
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
    if tag == "d" and type(x) is list:
        pairs = []
        for kv in x:
            if type(kv) is not list or len(kv) != 2:
                raise ValueError("malformed value")
            pairs.append((decode(kv[0], depth + 1, budget), decode(kv[1], depth + 1, budget)))
        _check_hashes([k for k, _ in pairs])
        return dict(pairs)
    raise ValueError("malformed value")


def _check_hashes(keys: list) -> None:
    """Refuse keys that would collide in a hash table (TypeError for unhashable ones, as building it would)."""
    if len(keys) > 64 and len({hash(k) for k in keys}) < len(keys) // 2:
        raise ValueError("set or dict keys with colliding hashes")
