"""Crash-safe file writing and content hashing shared by every step of the workflow.

Anything another step reads (plan, memory, scores, model directories) is written to a temporary
sibling and renamed into place, so a kill at any moment leaves either the old file or the new one,
never half of one.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; results are shared with the team
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (a log tail) as ``|`` blocks, readable as they were written."""


_BlockDumper.add_representer(
    str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def atomic_write_yaml(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, yaml.dump(obj, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True))


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a scratch directory that becomes ``out_dir`` only if the block finishes.

    A model directory is therefore complete or absent: a killed training job never leaves a
    half-written ``results/models/<id>/`` that a later step could load.
    """
    out_dir = Path(out_dir)
    if out_dir.name.endswith(".partial") and out_dir.is_dir():
        yield out_dir  # already the scratch of an enclosing atomic_directory, which renames it
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A SIGKILL skips the clean-up below; the scratch of a killed earlier attempt at the same
    # directory is garbage (Snakemake runs one job per output at a time), so it goes now.
    for stale in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".partial"))
    os.chmod(scratch, 0o777 & ~_UMASK)  # mkdtemp creates 0700
    try:
        yield scratch
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(scratch, out_dir)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_json(obj: Any) -> str:
    """The one serialisation that content hashes are taken over (sorted keys, no spaces)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def read_jsonl_lines(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, row) of every non-blank line; a bad line is a ValueError naming file:line."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            rows.append((line_no, row))
    return rows


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [row for _, row in read_jsonl_lines(path)]


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows))
