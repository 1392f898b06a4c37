"""notebooks/quickstart.ipynb, executed headless with nbclient in its tiny setting.

The kernel runs in notebooks/ with lbq importable, so the install cell installs nothing;
LBQ_NOTEBOOK_TINY=1 makes the parameter cell shrink each of the four runs to a few CPU steps.
The install cell's choice of source and its errors are checked without a kernel, in a Python
without site-packages, where lbq is not importable.
XLA's LLVM optimisation is switched off in the kernel to halve the CPU compile time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from runs import REPO

pytestmark = pytest.mark.slow  # the full tier: `python -m pytest -m "not slow"` skips it

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")
METHODS = ("direct W2A2", "progressive W2A32 -> W2A2", "stochastic precision", "joint distillation")


def test_notebook_is_stored_clean_with_a_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "LBQ_NOTEBOOK_TINY" in tagged[0].source
    assert 'LBQ_REPO_URL = os.environ.get("LBQ_REPO_URL", "")' in code[0].source
    assert "OWNER" not in code[0].source + code[1].source  # no placeholder to edit


def _install_cells(tmp_path, env_url: str | None, call: str | None = None):
    """Runs the notebook's first two code cells (LBQ_REPO_URL, install) in a Python without
    site-packages (`-S`), so lbq is not importable, from `tmp_path`: no checkout around it.
    With `call`, only the install cell's definitions run, then `call` is printed."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    url_cell, install_cell = [c.source for c in nb.cells if c.cell_type == "code"][:2]
    if call is not None:
        install_cell = install_cell.split("\n\nif importlib.util.find_spec")[0]
        install_cell += f"\nprint({call})"
    env = {k: v for k, v in os.environ.items() if k not in ("LBQ_REPO_URL", "PYTHONPATH")}
    if env_url is not None:
        env["LBQ_REPO_URL"] = env_url
    return subprocess.run(
        [sys.executable, "-S", "-c", url_cell + "\n" + install_cell],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_notebook_install_without_checkout_or_url_is_a_clear_error(tmp_path):
    proc = _install_cells(tmp_path, None)
    assert proc.returncode != 0 and "installing:" not in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (
        "RuntimeError: lbq: error: lbq is not installed and this notebook does not run inside "
        "an lbq checkout; set LBQ_REPO_URL (in the cell above, or as an environment variable) "
        "to the git URL of the lbq repository or to a checkout's folder"
    )
    proc = _install_cells(tmp_path, str(tmp_path / "lbq"))
    assert proc.returncode != 0
    assert (
        f"LBQ_REPO_URL='{tmp_path / 'lbq'}' is neither a URL nor the folder of an lbq"
        in (proc.stderr.strip().splitlines()[-1])
    )


def test_notebook_installs_from_the_checkout_or_from_lbq_repo_url(tmp_path):
    def source(cwd, url):
        proc = _install_cells(cwd, url, call="install_source(LBQ_REPO_URL)")
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    # Inside a checkout, the checkout wins over LBQ_REPO_URL; outside, LBQ_REPO_URL is used.
    assert source(os.path.join(REPO, "notebooks"), "https://example.org/x/lbq") == REPO
    assert source(tmp_path, "https://example.org/x/lbq@v1") == "git+https://example.org/x/lbq@v1"
    assert source(tmp_path, "git+ssh://git@example.org/x/lbq") == "git+ssh://git@example.org/x/lbq"
    assert source(tmp_path, REPO) == REPO


def test_notebook_runs_all_four_methods_and_prints_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("LBQ_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("LBQ_NOTEBOOK_WORKDIR", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": os.path.join(REPO, "notebooks")}},
    )
    client.execute()

    texts = [
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "stream"
    ]
    assert not any("installing:" in t for t in texts)  # lbq was importable: nothing installed
    last = nb.cells[[i for i, c in enumerate(nb.cells) if c.cell_type == "code"][-1]]
    printed = "".join(o.get("text", "") for o in last.outputs if o.output_type == "stream")
    assert printed.splitlines()[0].split()[:3] == ["method", "final", "top-1"]
    for method in METHODS:
        row = next(line for line in printed.splitlines() if line.startswith(method))
        numbers = [float(x) for x in re.findall(r"\d+\.\d{4}", row[len(method) :])]
        top1, best, top5 = numbers[:3]
        assert 0.0 <= top1 <= best <= 1.0 and top1 <= top5 <= 1.0
        assert ("joint" in method) == (len(numbers) == 4)  # only distillation has a teacher
    assert any("image/png" in o.get("data", {}) for o in last.outputs)
    for name in ("direct", "progressive", "stochastic", "distill"):
        assert (tmp_path / "runs" / name / "metrics.jsonl").is_file()
