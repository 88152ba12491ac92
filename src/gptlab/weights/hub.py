"""Downloading Hugging Face Hub repos into the local cache.

``download("owner/name")`` fetches what gptlab reads (config, safetensors
weights, tokenizer files, GGUF files) with ``huggingface_hub.snapshot_download``
into its usual cache (``$HF_HOME``, default ``~/.cache/huggingface``), so a
second call, or transformers itself, reuses the files. A repo already in the
cache is used without touching the network. Freshly downloaded weight files
are checked against the SHA-256 the Hub lists for them. Before anything is fetched,
the files still missing are added up (from the Hub's listing) and a download
that would not fit on the cache's disk is refused in one line.

Without a network connection the error says how to use a local directory instead.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from gptlab.cache import free_bytes, human_size, hub_cache_dir
from gptlab.errors import GptlabError
from gptlab.fileio import sha256_file
from gptlab.logs import get_logger

log = get_logger(__name__)

# What gptlab needs from a repo; pickled *.bin / *.pth weights are never fetched.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
GGUF_PATTERNS = ["*.json", "*.gguf"]


def _offline_error(repo_id: str, cause: Exception) -> GptlabError:
    return GptlabError(
        f"cannot download {repo_id!r} from the Hugging Face Hub and it is not in the local cache "
        f"({type(cause).__name__}: {str(cause).splitlines()[0][:160]}). Without internet, copy the model "
        "directory (config.json + model.safetensors + tokenizer files) to this machine and pass its path instead"
    )


def verify_checksums(directory: str | Path, expected: dict[str, str]) -> list[str]:
    """Check files in ``directory`` against ``{relative name: sha256}``; returns the names checked.

    Raises GptlabError naming every file whose hash differs (a corrupt or partial download).
    """
    directory = Path(directory)
    bad, checked = [], []
    for name, digest in sorted(expected.items()):
        f = directory / name
        if not f.is_file():
            continue
        checked.append(name)
        if sha256_file(f) != digest.lower():
            bad.append(name)
    if bad:
        raise GptlabError(f"checksum mismatch for {', '.join(bad)} in {directory}: the download is corrupt; "
                          "delete those files (or the cache folder) and download again")
    return checked


def _repo_info(repo_id: str, revision: str | None):
    """The Hub's listing of a repo: its commit and every file with its size (and LFS SHA-256)."""
    from huggingface_hub import HfApi

    return HfApi().model_info(repo_id, revision=revision, files_metadata=True)


def _hub_checksums(info) -> dict[str, str]:
    """SHA-256 of the repo's LFS files (the weights), as listed by the Hub."""
    return {s.rfilename: s.lfs.sha256 for s in info.siblings or [] if getattr(s, "lfs", None)}


def bytes_to_fetch(info, patterns: list[str], snapshot: Path | None) -> int:
    """Bytes of the repo's files matching ``patterns`` that are not already in the local ``snapshot``."""
    total = 0
    for s in info.siblings or []:
        if not any(fnmatch.fnmatch(s.rfilename, p) for p in patterns):
            continue
        if snapshot is not None and (snapshot / s.rfilename).exists():
            continue
        total += int(getattr(s, "size", None) or 0)
    return total


def check_free_disk(repo_id: str, info, patterns: list[str], cache_dir: str | None) -> None:
    """Refuse, in one line, a download that will not fit on the cache's disk."""
    where = Path(cache_dir) if cache_dir else hub_cache_dir()
    commit = getattr(info, "sha", None)
    snapshot = where / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit if commit else None
    need, free = bytes_to_fetch(info, patterns, snapshot), free_bytes(where)
    if need > free:
        raise GptlabError(f"{repo_id} needs {human_size(need)} but only {human_size(free)} is free on the disk of "
                          f"{where}; free space (`gptlab cache` lists what is cached, `gptlab cache rm` deletes it) "
                          "or pass --cache-dir on a bigger disk")


def download(repo_id: str, revision: str | None = None, cache_dir: str | None = None,
             include_gguf: bool = False, verify: bool = True) -> Path:
    """Local directory of a Hub repo (from the cache if present, else downloaded and verified)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
    except ImportError:
        raise GptlabError("downloading needs huggingface_hub: pip install huggingface_hub") from None
    patterns = GGUF_PATTERNS if include_gguf else ALLOW_PATTERNS
    kw = dict(revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **kw))
    except HFValidationError as e:
        raise GptlabError(f"{repo_id!r} is not a valid Hub repo id (owner/name): {e}") from None
    except Exception:  # not cached (completely): go to the network
        pass
    try:
        info = _repo_info(repo_id, revision)
    except Exception:  # offline, gated, not found: snapshot_download below says which, in its words
        info = None
    if info is not None:
        check_free_disk(repo_id, info, patterns, cache_dir)
    try:
        path = Path(snapshot_download(repo_id, etag_timeout=10, **kw))
    except GatedRepoError:
        raise GptlabError(f"{repo_id} is gated: accept its license on huggingface.co and log in "
                          "(`hf auth login` or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise GptlabError(f"Hub repo {repo_id!r} not found (or private: set HF_TOKEN); check the spelling") from None
    except Exception as e:  # connection refused, DNS failure, HF_HUB_OFFLINE=1, ...
        raise _offline_error(repo_id, e) from None
    if verify:
        if info is None:
            log.info("could not fetch checksums for %s; files not verified", repo_id)
        else:
            verify_checksums(path, _hub_checksums(info))
    return path


def download_command(repo_id: str, revision: str | None = None, cache_dir: str | None = None,
                     gguf: bool = False, verify: bool = True) -> int:
    """Download a Hugging Face model repo into the local cache and print its path.

    Only what gptlab reads is fetched: config, safetensors weights and tokenizer
    files (or, with --gguf, the .gguf files). The printed path can be passed to
    any command that takes a model.

    Args:
        repo_id: the Hub repo, e.g. HuggingFaceTB/SmolLM2-135M.
        revision: a branch, tag or commit (default: main).
        cache_dir: where to cache (default: the Hugging Face cache, $HF_HOME).
        gguf: fetch the repo's .gguf files instead of safetensors.
        verify: check the weights' SHA-256 against the Hub's listing.
    """
    path = download(repo_id, revision=revision, cache_dir=cache_dir, include_gguf=gguf, verify=verify)
    print(path)
    return 0


__all__ = ["bytes_to_fetch", "check_free_disk", "download", "download_command", "sha256_file", "verify_checksums"]
