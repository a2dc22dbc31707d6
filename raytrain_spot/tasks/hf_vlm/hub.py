"""A model named as Hugging Face users name it: a hub id (``HuggingFaceTB/SmolVLM-256M-Instruct``),
fetched through ``huggingface_hub``'s own client into its own cache, so its settings hold on every
node: ``HF_HOME`` / ``HF_HUB_CACHE`` (where the cache is), ``HF_ENDPOINT`` (a mirror),
``HF_HUB_OFFLINE=1`` (the cache alone), ``HF_TOKEN`` (gated and private models).

The driver resolves the id (and ``task.model.revision``: a branch, tag or commit) to a commit once,
before Ray starts, and the workers are handed that commit (``HuggingFaceVLMTask.resolved_settings``):
every node fetches the same files, however the repository moves on while the run trains. Like a
``gs://`` directory, each node fetches once into its cache (the client's file locks let the workers
of a node share one download) and every later start on that node reads the cached snapshot.
"""

from __future__ import annotations

import os
from typing import Optional

from raytrain_spot.config.errors import ConfigError

MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "pytorch_model*.bin"]
"""What a model directory needs (config, weights, processor and tokenizer files): not the ONNX,
GGUF or other frameworks' copies that many model repositories also hold."""


def is_hub_id(path: str) -> bool:
    """Whether ``path`` names a hub repository (``owner/name``) rather than a directory: it is no
    local path (none exists there, it has no scheme and does not start with ``/``, ``~`` or ``.``)."""
    if "://" in path or path.startswith(("/", "~", ".")) or os.path.exists(path) or path.count("/") != 1:
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def hub_snapshot(repo_id: str, revision: Optional[str]) -> str:
    """The local snapshot directory of ``repo_id`` at ``revision`` (named after its commit), fetched
    into the Hugging Face cache unless it is there; the user's mistakes as ConfigError with the fix."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id}@{revision}" if revision else repo_id
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES)
    except GatedRepoError:
        raise ConfigError(f"task.model.path: {repo_id} is a gated model on {constants.ENDPOINT}. Fix: accept its "
                          "terms on its page, then give every node a token (HF_TOKEN, or `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"task.model.path: {repo_id} is neither a local directory nor a model on "
                          f"{constants.ENDPOINT} (or it is private). Fix: correct the id or the path, or give a "
                          "token for a private model (HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ConfigError(f"task.model.revision: {repo_id} has no revision {revision!r}. Fix: use a branch, tag "
                          "or commit of the repository") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        cause = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else
                 f"{constants.ENDPOINT} cannot be reached ({type(error.__cause__ or error).__name__})")
        raise ConfigError(f"task.model.path: {at} is not in the Hugging Face cache {constants.HF_HUB_CACHE} and "
                          f"{cause}. Fix: fetch it there first (`hf download {repo_id}` on a connected machine, "
                          "with the same HF_HOME), point HF_ENDPOINT at a reachable mirror, or unset "
                          "HF_HUB_OFFLINE") from None
    except HfHubHTTPError as error:
        raise ConfigError(f"task.model.path: fetching {at} from {constants.ENDPOINT} failed ({error}). Fix: check "
                          "the endpoint (HF_ENDPOINT) and the token (HF_TOKEN), then start the run again") from None
    return path
