"""The config's error and dotted field names, shared by its parser (`lbq.plan.parse_config`),
the command line and the workdir's recorded config.

Every error is a `ConfigError` whose message starts with the dotted name of the field.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Callable, Iterable
from typing import Any


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
        children = [(f"{prefix}{key}.", value) for key, value in tree.items()]
    elif isinstance(tree, (list, tuple)) and tree and isinstance(tree[0], dict):
        children = [(f"{prefix[:-1]}[{index}].", entry) for index, entry in enumerate(tree)]
    else:
        return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}
    return {k: v for path, child in children for k, v in flat_fields(child, path).items()}


def whole_numbers(low: int, high: int) -> Callable[[str], list[int]]:
    """An argparse ``type`` for a comma-separated list of whole numbers in ``low..high``
    (``--bits=2,4``, ``--seeds=0,1``): a bad list exits with argparse's one-line usage error
    naming the flag, not a traceback.

    Raises (from the returned parser):
      argparse.ArgumentTypeError: for an empty entry, a non-integer or a value out of range.
    """

    def parse(text: str) -> list[int]:
        try:
            values = [int(entry) for entry in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of whole numbers"
            ) from None
        outside = [v for v in values if not low <= v <= high]
        if outside:
            raise argparse.ArgumentTypeError(f"{outside[0]} is not in {low}..{high}")
        return values

    return parse
