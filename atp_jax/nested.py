"""Nested dicts as flat ones with joined keys, and back.

    flatten({"a": {"b": 1}, "c": 2})       # {"a.b": 1, "c": 2}
    flatten(metrics, sep="/")              # {"categories/existence/score": ...}
    unflatten({"a.b": 1, "c": 2})          # {"a": {"b": 1}, "c": 2}
"""

from __future__ import annotations


def flatten(tree: dict, sep: str = ".") -> dict:
    """Every leaf of nested dicts under its keys joined by `sep`, in insertion order."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= {f"{key}{sep}{k}": v for k, v in flatten(value, sep).items()}
        else:
            out[str(key)] = value
    return out


def unflatten(flat: dict, sep: str = ".") -> dict:
    """The inverse of `flatten`."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree
