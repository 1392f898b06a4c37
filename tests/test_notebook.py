"""notebooks/quickstart.ipynb, executed headless with nbclient in its tiny setting.

The kernel runs in notebooks/, so the install cell finds this checkout and installs nothing;
LBQ_NOTEBOOK_TINY=1 makes the parameter cell shrink each of the four runs to a few CPU steps.
XLA's LLVM optimisation is switched off in the kernel to halve the CPU compile time.
"""

from __future__ import annotations

import os
import re

import pytest
from runs import REPO

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
    assert 'LBQ_REPO_URL = "https://github.com/OWNER/lbq"' in code[0].source


def test_notebook_runs_all_four_methods_and_prints_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("LBQ_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("LBQ_NOTEBOOK_WORKDIR", str(tmp_path / "runs"))
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
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
