"""The notebooks run top to bottom against the embedded local cluster through the Python API: one
launches and watches a run with a preemption, the other analyses it from its directory."""

import os
import tempfile

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO

pytestmark = pytest.mark.cluster
NOTEBOOKS = os.path.join(REPO, "notebooks")


def execute(name: str, env: dict) -> nbformat.NotebookNode:
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    saved = dict(os.environ)
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(notebook, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": NOTEBOOKS}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return notebook


def outputs(notebook) -> str:
    return "\n".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                     for o in cell.get("outputs", []))


def test_launch_watch_caption_then_analyse(tmp_path):
    """Notebook 1 fine-tunes the tiny Hugging Face LLaVA through the Python API, through a preemption,
    and captions an image with the trained weights; notebook 2 analyses that run."""
    env = {"RAYTRAIN_SPOT_REPO": REPO, "RUN_WORKDIR": str(tmp_path), "RUN_NAME": "nb",
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="rts-", dir="/tmp"),
           "EXTRA_OVERRIDES": f"checkpoint.local_dir={tmp_path}/node-local checkpoint.head_dir={tmp_path}/head "
                              f"task.model.cache_dir={tmp_path}/models task.data.cache_dir={tmp_path}/data"}
    launched = execute("01_launch_and_watch.ipynb", env)
    text = outputs(launched)
    assert "status: finished" in text
    assert "[group]" in text and "[notice]" in text
    caption = next(line for line in text.splitlines() if line.startswith("caption: "))
    assert len(caption.split()) > 1, "the trained model writes words"
    assert sum(o.get("output_type") == "display_data" for cell in launched.cells for o in cell.get("outputs", [])) >= 2

    analysed = execute("02_analyse_run.ipynb", {"RAYTRAIN_SPOT_REPO": REPO, "RUN_DIR": str(tmp_path / "outputs" / "nb")})
    text = outputs(analysed)
    assert "nb finished" in text and "goodput" in text and "notice" in text and "steps redone: 0" in text
    assert (tmp_path / "outputs" / "nb" / "ledger.png").exists()
