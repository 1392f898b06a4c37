"""The one error type of lbq.deploy (a run, model folder or file that cannot be used), and the
JSON files it reads (written through `lbq.io.write_json`)."""

from __future__ import annotations

import json
import os
from typing import Any


class DeployError(ValueError):
    """A one-line reason, naming the path or field at fault."""


def read_json(path: str, missing: str) -> Any:
    """The JSON document at ``path``.

    Raises:
      DeployError: ``missing`` when there is no such file; naming the path when it cannot be
        read or is not JSON.
    """
    if not os.path.isfile(path):
        raise DeployError(missing)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise DeployError(f"{path} is unreadable: {error}") from None
