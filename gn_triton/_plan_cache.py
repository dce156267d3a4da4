"""Tuned plans kept on disk, so that a new process reuses them instead of timing candidates again
(a diffusion U-Net has a dozen GroupNorm shapes, each tuned forward and backward at its first step).

One JSON file per device name and versions (torch, triton, gn_triton) under GN_TRITON_CACHE_DIR
(default: $XDG_CACHE_HOME/gn_triton, or ~/.cache/gn_triton). A write is read-merge-replace under an
exclusive lock, so concurrent processes neither tear the file nor drop each other's entries. A file
that cannot be read (corrupt, truncated, not ours) is ignored with a warning and replaced at the
next write; a cache folder that cannot be written only costs the re-tuning.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import triton

from ._version import __version__

_loaded: dict[Path, dict[str, dict]] = {}


def cache_dir() -> Path:
    if os.environ.get("GN_TRITON_CACHE_DIR"):
        return Path(os.environ["GN_TRITON_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gn_triton"


def cache_file(device: torch.device) -> Path:
    name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else str(device)
    versions = f"{name}-torch{torch.__version__}-triton{triton.__version__}-gn_triton{__version__}"
    return cache_dir() / f"plans-{re.sub(r'[^A-Za-z0-9._-]+', '_', versions)}.json"


def entry_key(key: tuple) -> str:
    """A tuning key as the file's entry name."""
    return "|".join(map(str, key))


def load(device: torch.device) -> dict[str, dict]:
    """The device's stored plans (read from disk once per process)."""
    path = cache_file(device)
    if path not in _loaded:
        _loaded[path] = _read(path)
    return _loaded[path]


def store(device: torch.device, key: str, plan: dict) -> None:
    """Add one tuned plan (a dict of Plan fields) to the device's file and to memory."""
    path = cache_file(device)
    load(device)[key] = plan
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            entries = _read(path)
            entries[key] = plan
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entries, indent=0, sort_keys=True))
            os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half
    except OSError as exc:
        warnings.warn(f"gn_triton: could not save tuned plans to {path} ({exc})", stacklevel=2)


def _read(path: Path) -> dict[str, dict]:
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        warnings.warn(f"gn_triton: ignoring the unreadable plan cache {path} ({exc})", stacklevel=3)
        return {}
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        warnings.warn(f"gn_triton: ignoring the plan cache {path}: not a table of plans", stacklevel=3)
        return {}
    return entries


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no POSIX locks: the atomic replace still keeps the file whole
        yield
        return
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
