"""The notebooks run top to bottom against the embedded local cluster through the Python API: one
launches and watches a run with a preemption, the other analyses it from its directory. On a
cluster's head node they join that cluster instead, and the cluster YAMLs copy them there.

``RAYTRAIN_SPOT_SAVE_NOTEBOOKS=1`` writes the executed notebooks back into notebooks/, outputs
and all, so a reader of the repository sees the plots (docs/extending.md, "From Python")."""

import glob
import os
import socket
import tempfile

import nbformat
import pytest
import yaml
from nbclient import NotebookClient

from raytrain_spot.cluster.running import running_cluster_address
from tests.conftest import REPO

NOTEBOOKS = os.path.join(REPO, "notebooks")
SAVE = os.environ.get("RAYTRAIN_SPOT_SAVE_NOTEBOOKS") == "1"


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


def save(name: str, notebook: nbformat.NotebookNode, private: str) -> None:
    """Write the executed notebook back: the test's own temporary paths shown as what they stand for,
    no per-cell timings, and no warnings that libraries print to stderr about this machine's set-up."""
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if o.get("name") != "stderr"]
        for output in cell.get("outputs", []):
            if "text" in output:
                output["text"] = output["text"].replace(private, "~/raytrain-spot")
    nbformat.write(notebook, os.path.join(NOTEBOOKS, name))


def outputs(notebook) -> str:
    return "\n".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                     for o in cell.get("outputs", []))


@pytest.mark.cluster
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
    if SAVE:
        save("01_launch_and_watch.ipynb", launched, str(tmp_path))
        save("02_analyse_run.ipynb", analysed, str(tmp_path))


def test_a_running_cluster_is_found_as_ray_finds_it(tmp_path, monkeypatch):
    """The notebooks join a cluster when this machine is on one: ``$RAY_ADDRESS``, or the address
    ``ray start`` recorded, when something answers there (a record left by a crash is no cluster)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert running_cluster_address() is None, "no record, no cluster"
    (tmp_path / "ray").mkdir()
    with socket.socket() as gcs:
        gcs.bind(("127.0.0.1", 0))
        gcs.listen()
        address = f"127.0.0.1:{gcs.getsockname()[1]}"
        (tmp_path / "ray" / "ray_current_cluster").write_text(address + "\n")
        assert running_cluster_address() == address
    assert running_cluster_address() is None, "a recorded address nothing answers on"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert running_cluster_address() == "10.0.0.2:6379"


def test_every_gcp_cluster_copies_the_notebooks_where_jupyterlab_serves(tmp_path):
    for path in sorted(glob.glob(os.path.join(REPO, "cluster", "gcp-spot*.yaml"))):
        config = yaml.safe_load(open(path))
        assert config["file_mounts"].get("~/raytrain-spot/notebooks") == "./notebooks", path
        assert any('--ServerApp.root_dir="$HOME"' in c for c in config["head_start_ray_commands"]), path
