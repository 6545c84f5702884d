"""Every notebook in notebooks/ runs top to bottom in small mode, and is stored clean.

Each notebook runs from a copy in a temporary directory (so no output is written back) in a
fresh ``python3`` kernel: ipykernel registers that kernel spec when it is installed, and
jupyter_client falls back to ipykernel's own spec for the running interpreter.
"""
import glob
import os
import shutil

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
CELL_TIMEOUT_S = 300


def test_there_are_notebooks():
  names = {os.path.basename(p) for p in NOTEBOOKS}
  assert {"quickstart.ipynb", "own_model.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, (
          f"{os.path.basename(path)} holds outputs: clear them before committing.")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_in_small_mode(path, tmp_path, monkeypatch):
  monkeypatch.setenv("BSPARSE_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, not the tests' eight
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' workdirs and exports
  copy = tmp_path / os.path.basename(path)
  shutil.copy(path, copy)
  nb = nbformat.read(copy, as_version=4)
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on failure


def test_readme_own_model_snippet_runs(tmp_path, monkeypatch, capsys):
  """The README's 'Use the layers in your own model' code runs as printed."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  section = readme.split("## Use the layers in your own model", 1)[1]
  code = section.split("```python\n", 1)[1].split("```", 1)[0]
  monkeypatch.chdir(tmp_path)
  exec(compile(code, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102
  assert (tmp_path / "blocks.npz").exists()
  out = capsys.readouterr().out
  assert "fc1/kron_16x16" in out
