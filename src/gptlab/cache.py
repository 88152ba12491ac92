"""What the model caches hold on disk: list it, and free the space for real.

Two caches are looked at:

- the Hugging Face hub cache, where ``gptlab download``, any ``owner/name`` model reference and
  transformers keep their files: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
  ``~/.cache/huggingface/hub``. It is read with ``huggingface_hub``'s cache scanner
  (``scan_cache_dir``): one item per repo, with its revisions. It is deleted through the scanner's
  delete strategy, which removes refs and snapshots first and then only the blobs that no kept
  revision still links to;
- gptlab's own cache, ``$GPTLAB_CACHE`` (else ``~/.cache/gptlab``): downloaded datasets
  (``data/``), fit's machine calibration (``fit-calibration.json``) and whatever else gptlab keeps
  there. Each top-level file, and each entry of a top-level folder, is one item.

A removal checks afterwards that every file it meant to delete is gone; one that is still there is a
:class:`GptlabError` naming it, never a silent "freed 0 bytes".

    listing = list_cache()                      # CacheListing: items, the two folders, free disk
    removal = remove_cache(older_than="30d")    # Removal: what went, the bytes freed
"""

from __future__ import annotations

import fnmatch
import json as _json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.fileio import cache_root

# The top-level names of gptlab's own cache, and what they hold (anything else is "file").
_OWN_KINDS = {"data": "dataset", "tokenizers": "tokenizer", "fit-calibration.json": "calibration"}

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass
class CacheItem:
    """One cached thing: a hub repo (all its revisions) or one entry of gptlab's cache."""

    cache: str  # "hub" | "gptlab"
    name: str  # the repo id, or the path relative to gptlab's cache (data/tinyshakespeare.txt)
    kind: str  # hub: model | dataset | space; gptlab: dataset | tokenizer | calibration | file
    path: Path
    size: int  # bytes on disk (hub: the blobs, each counted once)
    last_used: float  # seconds since the epoch: the newest access or modification seen
    revisions: list[str] = field(default_factory=list)  # hub: commit hashes
    refs: list[str] = field(default_factory=list)  # hub: the branches/tags pointing at them


@dataclass
class CacheListing:
    """What :func:`list_cache` found."""

    items: list[CacheItem]
    hub_dir: Path
    gptlab_dir: Path
    free: dict[str, int]  # folder -> free bytes on its disk
    warnings: list[str] = field(default_factory=list)  # hub entries the scanner could not read

    @property
    def total(self) -> int:
        return sum(i.size for i in self.items)


@dataclass
class Removal:
    """What :func:`remove_cache` removed (or, with ``dry_run``, would remove)."""

    items: list[CacheItem]
    freed: int  # bytes
    dry_run: bool


# ---- where the caches are ------------------------------------------------------------------------

def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now: ``$HF_HUB_CACHE`` (or the older
    ``$HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``, else what ``huggingface_hub`` resolved."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    try:
        from huggingface_hub import constants
    except ImportError:
        return Path.home() / ".cache" / "huggingface" / "hub"
    return Path(constants.HF_HUB_CACHE).expanduser()


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the disk that holds ``path`` (or would hold it: its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


# ---- reading -------------------------------------------------------------------------------------

def _scan_hub(hub_dir: Path):
    """(the scanner's HFCacheInfo or None, items, warnings) for the hub cache at ``hub_dir``."""
    if not hub_dir.is_dir():
        return None, [], []
    try:
        from huggingface_hub import scan_cache_dir
    except ImportError:
        return None, [], [f"{hub_dir} not read: huggingface_hub is not installed (pip install huggingface_hub)"]
    info = scan_cache_dir(hub_dir)
    items = [CacheItem("hub", repo.repo_id, repo.repo_type, Path(repo.repo_path), int(repo.size_on_disk),
                       max(repo.last_accessed, repo.last_modified),
                       sorted(r.commit_hash for r in repo.revisions),
                       sorted(ref for r in repo.revisions for ref in r.refs))
             for repo in info.repos]
    return info, items, [str(w) for w in info.warnings]


def _tree_size_and_time(path: Path) -> tuple[int, float]:
    """(bytes of every file under ``path``, the newest access/modification time), symlinks not followed."""
    st = path.lstat()
    size, last = (st.st_size if not path.is_dir() else 0), max(st.st_atime, st.st_mtime)
    if path.is_dir() and not path.is_symlink():
        for root, _dirs, files in os.walk(path):
            for name in files:
                try:
                    fst = os.lstat(os.path.join(root, name))
                except OSError:
                    continue
                size += fst.st_size
                last = max(last, fst.st_atime, fst.st_mtime)
    return size, last


def _scan_own(root: Path, hub_dir: Path) -> list[CacheItem]:
    """gptlab's cache: each top-level file, and each entry of each top-level folder, as one item."""
    if not root.is_dir():
        return []
    entries = []
    for top in sorted(root.iterdir()):
        if top.name.startswith(".") or top.resolve() == hub_dir.resolve():
            continue  # temp files of an atomic write in progress; a hub cache kept inside GPTLAB_CACHE
        children = sorted(c for c in top.iterdir() if not c.name.startswith(".")) \
            if top.is_dir() and not top.is_symlink() else [top]
        for path in children:
            size, last = _tree_size_and_time(path)
            entries.append(CacheItem("gptlab", path.relative_to(root).as_posix(), _OWN_KINDS.get(top.name, "file"),
                                     path, size, last))
    return entries


def list_cache() -> CacheListing:
    """Everything in the Hugging Face hub cache and gptlab's own cache, with sizes, last use and free disk."""
    hub_dir, own_dir = hub_cache_dir(), cache_root()
    _info, hub_items, warnings = _scan_hub(hub_dir)
    items = hub_items + _scan_own(own_dir, hub_dir)
    free = {str(d): free_bytes(d) for d in (hub_dir, own_dir)}
    return CacheListing(items, hub_dir, own_dir, free, warnings)


# ---- choosing ------------------------------------------------------------------------------------

def parse_age(text: str) -> float:
    """``"30d"`` -> seconds. Units: s, m (minutes), h, d, w; a bare number is days."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(text).lower())
    if m is None:
        raise GptlabError(f"older_than={text!r} is not an age; write a number and a unit, e.g. 30d, 12h or 2w "
                          "(s, m, h, d, w)")
    return float(m.group(1)) * _UNITS[m.group(2) or "d"]


def select(items: list[CacheItem], pattern: str | None = None, older_than: str | None = None,
           everything: bool = False, now: float | None = None) -> list[CacheItem]:
    """The items a removal takes: those whose name matches the glob ``pattern`` (case-insensitive; a
    pattern without wildcards names an item exactly) and/or not used for ``older_than``; or all."""
    if everything and (pattern or older_than):
        raise GptlabError("--all removes everything; give it alone, or drop it and give a PATTERN "
                          "and/or --older-than")
    if not everything and not pattern and not older_than:
        raise GptlabError("say what to remove: a PATTERN (a repo id or file name, * wildcards), "
                          "--older-than 30d, or --all; `gptlab cache` lists what is there")
    chosen = list(items)
    if pattern:
        glob = pattern.lower()
        chosen = [i for i in chosen if fnmatch.fnmatchcase(i.name.lower(), glob)
                  or fnmatch.fnmatchcase(f"{i.cache}:{i.name}".lower(), glob)]
        if not chosen:
            raise GptlabError(f"nothing cached matches {pattern!r}; `gptlab cache` lists the names "
                              "(use * wildcards, e.g. 'HuggingFaceTB/*')")
    if older_than:
        cutoff = (time.time() if now is None else now) - parse_age(older_than)
        chosen = [i for i in chosen if i.last_used < cutoff]
    return chosen


# ---- deleting ------------------------------------------------------------------------------------

def _delete_hub(info, items: list[CacheItem]) -> int:
    """Delete every revision of the hub repos ``items`` through the scanner's strategy; bytes freed."""
    hashes = [h for i in items for h in i.revisions]
    strategy = info.delete_revisions(*hashes)
    meant = [*strategy.blobs, *strategy.snapshots, *strategy.repos]
    strategy.execute()
    left = [str(p) for p in meant if os.path.lexists(p)]
    if left:
        raise GptlabError(f"the Hugging Face cache kept {len(left)} of the files it was asked to delete "
                          f"(first: {left[0]}); check their permissions and run gptlab cache rm again")
    return int(strategy.expected_freed_size)


def _delete_own(items: list[CacheItem]) -> int:
    """Delete the files/folders of gptlab's cache ``items``; bytes freed."""
    freed = 0
    for item in items:
        try:
            if item.path.is_dir() and not item.path.is_symlink():
                shutil.rmtree(item.path)
            else:
                item.path.unlink()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise GptlabError(f"cannot delete {item.path} ({e.strerror}); check its permissions "
                              "and run gptlab cache rm again") from None
        if os.path.lexists(item.path):
            raise GptlabError(f"{item.path} is still there after deleting it; check its permissions")
        freed += item.size
    return freed


def remove_cache(pattern: str | None = None, older_than: str | None = None, all: bool = False,
                 dry_run: bool = False) -> Removal:
    """Delete cached hub repos and gptlab files (see :func:`select` for which); returns what went.

    With ``dry_run`` nothing is deleted and ``Removal.freed`` is what would be freed.
    """
    hub_dir, own_dir = hub_cache_dir(), cache_root()
    info, hub_items, _warnings = _scan_hub(hub_dir)
    chosen = select(hub_items + _scan_own(own_dir, hub_dir), pattern, older_than, all)
    hub = [i for i in chosen if i.cache == "hub"]
    own = [i for i in chosen if i.cache == "gptlab"]
    if dry_run:
        would = info.delete_revisions(*[h for i in hub for h in i.revisions]).expected_freed_size if hub else 0
        return Removal(chosen, int(would) + sum(i.size for i in own), True)
    freed = (_delete_hub(info, hub) if hub else 0) + _delete_own(own)
    return Removal(chosen, freed, False)


# ---- showing -------------------------------------------------------------------------------------

def human_size(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_age(seconds_ago: float) -> str:
    """``90000`` -> ``1 day ago``."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds_ago >= size:
            n = int(seconds_ago // size)
            return f"{n} {unit}{'s' if n != 1 else ''} ago"
    return "just now"


def render_listing(listing: CacheListing, now: float | None = None) -> str:
    """The table ``gptlab cache`` prints: one section per cache, then the total."""
    now = time.time() if now is None else now
    lines = []
    for cache, title, folder in (("hub", "Hugging Face hub cache", listing.hub_dir),
                                 ("gptlab", "gptlab cache", listing.gptlab_dir)):
        items = [i for i in listing.items if i.cache == cache]
        lines.append(f"{title}: {folder} ({human_size(listing.free[str(folder)])} free on its disk)")
        if not items:
            lines.append("  (empty)" if folder.is_dir() else "  (not created yet)")
            continue
        width = max(len(i.name) for i in items)
        for i in sorted(items, key=lambda i: -i.size):
            revs = f"{len(i.revisions)} rev{'s' if len(i.revisions) != 1 else ''}" if cache == "hub" else i.kind
            lines.append(f"  {human_size(i.size):>10}  {human_age(now - i.last_used):<15} {revs:<11} "
                         f"{i.name.ljust(width)}  {i.path}")
    lines += [f"warning: {w}" for w in listing.warnings]
    lines.append(f"total: {human_size(listing.total)} in {len(listing.items)} item"
                 f"{'s' if len(listing.items) != 1 else ''}")
    return "\n".join(lines)


def _as_json(item: CacheItem) -> dict:
    return {**asdict(item), "path": str(item.path)}


def cache_command(json: bool = False) -> int:
    """List what is cached: Hugging Face hub repos and gptlab's own files, with size, last use, path
    and the free disk.

    The hub cache is $HF_HUB_CACHE (else $HF_HOME/hub, else ~/.cache/huggingface/hub); gptlab's is
    $GPTLAB_CACHE (else ~/.cache/gptlab). Free space with `gptlab cache rm`.

    Args:
        json: print JSON (items with bytes and epoch seconds) instead of the table.
    """
    listing = list_cache()
    if json:
        print(_json.dumps({"hub_dir": str(listing.hub_dir), "gptlab_dir": str(listing.gptlab_dir),
                          "free": listing.free, "total": listing.total, "warnings": listing.warnings,
                          "items": [_as_json(i) for i in listing.items]}, indent=2))
    else:
        print(render_listing(listing))
    return 0


def cache_rm_command(pattern: str | None = None, older_than: str | None = None, all: bool = False,
                     dry_run: bool = False) -> int:
    """Delete cached models and files for real, and print what was freed.

    Examples: `gptlab cache rm 'HuggingFaceTB/*'`, `gptlab cache rm --older-than 30d`,
    `gptlab cache rm --all --dry-run`. A hub repo goes with all its revisions.

    Args:
        pattern: what to remove: a repo id or a gptlab cache path (data/tinyshakespeare.txt), * wildcards.
        older_than: remove what was not used for this long: 30d, 12h, 2w (s, m, h, d, w).
        all: remove everything in both caches.
        dry_run: only print what would be removed and freed.
    """
    removal = remove_cache(pattern, older_than, all, dry_run)
    verb = "would remove" if dry_run else "removed"
    for i in removal.items:
        print(f"{verb} {i.cache}:{i.name} ({human_size(i.size)})  {i.path}")
    if not removal.items:
        print("nothing to remove")
        return 0
    print(f"{'would free' if dry_run else 'freed'} {human_size(removal.freed)} ({removal.freed:,} bytes) "
          f"in {len(removal.items)} item{'s' if len(removal.items) != 1 else ''}")
    return 0


cache_rm_command.positional = ("pattern",)  # type: ignore[attr-defined]  # `gptlab cache rm 'org/*'`

__all__ = ["CacheItem", "CacheListing", "Removal", "cache_command", "cache_rm_command", "free_bytes",
           "hub_cache_dir", "list_cache", "parse_age", "remove_cache", "select"]
