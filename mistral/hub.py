"""Models by name: a Hugging Face repo id ("mistralai/Mistral-7B-Instruct-v0.3") resolved to a
folder through huggingface_hub, from its local cache when offline (HF_HUB_OFFLINE=1) or when the
files are there, downloaded with its progress bar otherwise."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from mistral.errors import MistralError

# "org/name" as the hub spells repo ids (an optional @revision after it).
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
TOKENIZERS = ["tokenizer.model*", "tekken.json", "tokenizer.json", "tokenizer_config.json"]
# One layout's files, not both: Mistral's repos often hold consolidated.* beside model-*.
MISTRAL_FILES = ["params.json", "consolidated*.safetensors", "consolidated.00.pth", *TOKENIZERS]
HF_FILES = ["config.json", "model*.safetensors", "model.safetensors.index.json", *TOKENIZERS]


def is_repo_id(name: str) -> bool:
    """Whether ``name`` reads as a repo id and names no folder here."""
    return bool(REPO_ID.match(name)) and not Path(name).exists()


def wanted(files: list[str]) -> list[str]:
    """The patterns of one layout: Mistral's own when the repo has it, else Hugging Face's."""
    mistral = "params.json" in files and any(
        fnmatch.fnmatch(f, "consolidated*.safetensors") for f in files
    )
    return MISTRAL_FILES if mistral else HF_FILES


def resolve(name: str) -> Path:
    """The local folder of repo ``name`` (``org/repo`` or ``org/repo@revision``)."""
    try:
        import huggingface_hub as hub
        from huggingface_hub import errors
    except ImportError:
        raise MistralError(
            f"{name!r} is not a folder; to load it from the Hugging Face hub, pip install "
            "huggingface_hub (or '.[hub]')"
        ) from None
    repo, _, revision = name.partition("@")
    revision = revision or None
    try:  # the local cache first: no network when the files are there
        return Path(hub.snapshot_download(repo, revision=revision, local_files_only=True))
    except errors.LocalEntryNotFoundError:
        if hub.constants.HF_HUB_OFFLINE:
            raise MistralError(
                f"{name}: not in the local Hugging Face cache ({hub.constants.HF_HUB_CACHE}) "
                "and HF_HUB_OFFLINE is set: download it first, or unset HF_HUB_OFFLINE"
            ) from None
    try:
        patterns = wanted(hub.list_repo_files(repo, revision=revision))
        return Path(hub.snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except errors.GatedRepoError:
        raise MistralError(
            f"{name}: a gated repo; accept its terms on the hub and log in (hf auth login)"
        ) from None
    except errors.RepositoryNotFoundError:
        raise MistralError(f"{name}: no such repo on the Hugging Face hub (or no access)") from None
    except errors.RevisionNotFoundError:
        raise MistralError(f"{name}: no revision {revision!r}") from None
    except Exception as e:  # the network's errors (httpx, OSError, the hub's HTTP errors)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise MistralError(f"{name}: cannot download from the Hugging Face hub ({first})") from None
