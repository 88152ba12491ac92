"""Named datasets downloaded on demand into a cache, each checked by SHA-256.

    path = fetch_dataset("tinyshakespeare")     # ~/.cache/gptlab/data/tinyshakespeare.txt

The cache root is ``$GPTLAB_CACHE`` (default ``~/.cache/gptlab``); data files
live in its ``data/`` folder. A file whose checksum is wrong is deleted, never
kept. Offline, the error names the URL and the exact path where the file can
be put by hand.
"""

from __future__ import annotations

import hashlib
import io
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write_bytes, cache_root, sha256_file


@dataclass(frozen=True)
class Dataset:
    """One downloadable file: where it comes from and what it must hash to."""

    name: str
    url: str
    filename: str          # name in the cache folder
    sha256: str            # of the final file (for a zip: of the extracted member)
    size: int              # bytes of the final file
    kind: str              # "text" (a pretraining corpus), "tsv", "json"
    zip_member: str | None = None  # the file to extract when the download is a zip


DATASETS: dict[str, Dataset] = {d.name: d for d in [
    Dataset("the-verdict",
            "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt",
            "the-verdict.txt", "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f", 20_479, "text"),
    Dataset("tinyshakespeare",
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            "tinyshakespeare.txt", "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", 1_115_394, "text"),
    Dataset("sms-spam", "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
            "SMSSpamCollection.tsv", "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d", 477_907,
            "tsv", zip_member="SMSSpamCollection"),
    Dataset("instruction-data",
            "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json",
            "instruction-data.json", "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944", 203_524, "json"),
]}


def cache_dir() -> Path:
    """The data cache folder: ``$GPTLAB_CACHE/data``, else ``~/.cache/gptlab/data``."""
    return cache_root() / "data"


def download_url(url: str, timeout: float = 60.0) -> bytes:
    """The bytes at ``url`` (tests replace this function to stay offline)."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def fetch_dataset(name: str) -> Path:
    """Path of dataset ``name`` in the cache, downloading and checking it first if needed.

    Args:
        name: one of :data:`DATASETS` (``the-verdict``, ``tinyshakespeare``,
            ``sms-spam``, ``instruction-data``).
    """
    if name not in DATASETS:
        raise GptlabError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    ds = DATASETS[name]
    path = cache_dir() / ds.filename
    stale = ""
    if path.is_file():
        digest = sha256_file(path)
        if digest == ds.sha256:
            return path
        # A truncated download or a wrong file put there by hand: fetch a good copy,
        # which replaces it; if that fails, say so and leave the file for the user.
        stale = f"{path} is there but has SHA-256 {digest}, expected {ds.sha256}; "
    hint = f"download {ds.url} by hand and put {'its ' + ds.zip_member + ' as ' if ds.zip_member else 'it at '}{path}"
    try:
        data = download_url(ds.url)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise GptlabError(f"{stale}could not download dataset {name!r} ({e}); offline? {hint}") from None
    if ds.zip_member:
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                data = z.read(ds.zip_member)
        except (zipfile.BadZipFile, KeyError) as e:
            raise GptlabError(f"the download of {name!r} from {ds.url} is not the expected zip ({e}); {hint}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != ds.sha256:
        raise GptlabError(f"dataset {name!r} from {ds.url} has SHA-256 {digest}, expected {ds.sha256} "
                          f"({len(data):,} bytes, expected {ds.size:,}); the file was not kept. "
                          f"Retry later, or {hint}")
    atomic_write_bytes(path, data)
    return path
