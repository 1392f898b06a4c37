"""Field checks of the config parser (`lbq.plan.parse_config`).

Every error is a `ConfigError` whose message starts with the dotted name of the field.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
from collections.abc import Iterable
from typing import Any

from lbq.quant.quantizers import check_bits


class ConfigError(ValueError):
    """A config field has a bad value; the message names the field."""


def did_you_mean(name: str, candidates: Iterable[str], prefix: str = "", n: int = 1) -> str:
    """``"; did you mean PREFIX+X?"`` for the (at most ``n``, comma-separated) candidates closest
    to ``name`` (`difflib.get_close_matches`), or "" when none is close: the one hint of every
    "not a config field" and "unknown dataset" error."""
    close = difflib.get_close_matches(name, list(candidates), n=n)
    return f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""


def get_field(config: Any, field: str) -> Any:
    """The value of dotted ``field``.

    Raises:
      ConfigError: when the config lacks it.
    """
    node = config
    for part in field.split("."):
        try:
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        except (AttributeError, KeyError):
            raise ConfigError(f"{field} is missing from the config") from None
    return node


def flat_fields(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A config as plain dicts and lists (``to_dict()`` or a recorded config.json) flattened to
    {dotted field: value}: ``quant.w_bits``, and ``stages[0].w_bits`` for the stage list.

    Tuples become lists (as JSON records them) and an empty section has no entry: the one walk
    of the config's fields, for the record's comparison and the "did you mean" of overrides.
    """
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flat_fields(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, (list, tuple)) and tree and isinstance(tree[0], dict):
        out = {}
        for index, entry in enumerate(tree):
            out.update(flat_fields(entry, f"{prefix[:-1]}[{index}]."))
        return out
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


_KINDS = {
    "int": is_int,
    "number": is_number,
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
}


def check_type(config: Any, field: str, kind: str, *, low=None, high=None, optional=False):
    """Checks one field: kind is 'int', 'number', 'bool' or 'str'; low/high are inclusive.

    Returns:
      The value (None for an unset optional field).
    """
    value = get_field(config, field)
    if value is None and optional:
        return None
    if not _KINDS[kind](value):
        raise ConfigError(f"{field}={value!r} has type {type(value).__name__}; expected {kind}")
    if kind == "number" and not math.isfinite(value):
        raise ConfigError(f"{field}={value!r} must be a finite number")
    if low is not None and value < low:
        raise ConfigError(f"{field}={value!r} must be >= {low}")
    if high is not None and value > high:
        raise ConfigError(f"{field}={value!r} must be <= {high}")
    return value


def check_choice(config: Any, field: str, choices: tuple) -> Any:
    value = get_field(config, field)
    if value not in choices:
        raise ConfigError(f"{field}={value!r} is not one of {choices}")
    return value


def check_bits_value(value: Any, field: str) -> int:
    """A bit-width (a whole number in 1..32) of config field ``field``."""
    try:
        return check_bits(value, field)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_path(config: Any, field: str) -> str | None:
    """An optional local path that must exist (remote ``gs://`` paths are checked on read)."""
    path = check_type(config, field, "str", optional=True)
    if path and "://" not in path and not os.path.exists(path):
        raise ConfigError(f"{field}={path!r} does not exist")
    return path or None
