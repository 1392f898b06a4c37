"""Settings for every test process, set before JAX starts its backend."""

import os

from runs import FAST_XLA

if FAST_XLA not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_XLA}".strip()
