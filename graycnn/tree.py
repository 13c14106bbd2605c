"""Pytree leaves named by 'a/b/c' paths.

Example:
    >>> flat = flatten({"params": {"stem": {"kernel": k}}})
    >>> list(flat)
    ['params/stem/kernel']
    >>> tree_get(tree, "params/stem/kernel") is k
    True
"""

from collections.abc import Mapping
from typing import Any

from flax import traverse_util


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Returns {'a/b/c': leaf} for a nested dict."""
    return traverse_util.flatten_dict(_to_dict(tree), sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten`."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def tree_get(tree: Mapping[str, Any], path: str) -> Any:
    """Returns the leaf or subtree at `path`; a missing path lists the paths that exist."""
    node: Any = tree
    for i, key in enumerate(path.split("/")):
        if not isinstance(node, Mapping) or key not in node:
            where = "/".join(path.split("/")[:i]) or "<root>"
            available = sorted(flatten(tree)) if isinstance(tree, Mapping) else []
            raise KeyError(
                f"no path {path!r} (missing {key!r} under {where}); existing paths: "
                + ", ".join(available[:200])
                + (" ..." if len(available) > 200 else "")
            )
        node = node[key]
    return node


def _to_dict(tree: Mapping[str, Any]) -> dict[str, Any]:
    # FrozenDicts and other mappings flatten as plain nested dicts.
    return {k: _to_dict(v) if isinstance(v, Mapping) else v for k, v in tree.items()}
