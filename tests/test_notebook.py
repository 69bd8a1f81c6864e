"""The quickstart notebook executes headless (nbclient) with its smoke setting."""

import os

import pytest

from tests.helpers import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("DCJAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("DCJAX_NOTEBOOK_WORKDIR", str(tmp_path))
    notebook = nbformat.read(os.path.join(REPO, "notebooks", "quickstart.ipynb"), as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(images) >= 8  # DeepCluster's five figures, SeLa's two, the IA comparison
    assert os.path.exists(os.path.join(tmp_path, "deepcluster", "figures", "tsne.png"))
    text = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    assert "warning/sinkhorn_not_converged" in text  # the capped run's warning, read back
    assert "export equals embed: True" in text
    assert "\r" in text and "img/s" in text  # the progress bar, redrawn in the cell
