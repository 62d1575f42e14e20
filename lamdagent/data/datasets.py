"""Training datasets: an embedded generated task, a local JSONL/parquet file, or a hub dataset.

Each is prepared into ``results/datasets/<name>.jsonl`` with rows ``{"prompt", "completion"}`` (kind
``sft``) or ``{"prompt", "chosen", "rejected"}`` (kind ``preference``, for DPO); the sha256 and row
count of that file enter every recipe that trains on it.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from lamdagent.store.fileio import read_jsonl, read_jsonl_lines, sha256_file, write_jsonl

DEFAULT_FIELDS = {"prompt": "prompt", "completion": "completion"}
PREFERENCE_FIELDS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}


def default_fields(spec: dict) -> dict:
    return PREFERENCE_FIELDS if spec.get("kind") == "preference" else DEFAULT_FIELDS


class DatasetError(ValueError):
    pass


def _rows_from_file(path: Path) -> list[tuple[str, dict]]:
    """(location, row) pairs; the location is ``file:line`` for JSONL, ``file row N`` for parquet."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    if path.suffix == ".parquet":
        import pandas as pd

        frame = pd.read_parquet(path)
        return [(f"{path} row {index}", row) for index, row in enumerate(frame.to_dict(orient="records"))]
    try:
        return [(f"{path}:{line_no}", row) for line_no, row in read_jsonl_lines(path)]
    except ValueError as err:
        raise DatasetError(str(err)) from None


def _map_rows(located_rows, fields: dict | None) -> list[dict]:
    fields = fields or DEFAULT_FIELDS
    out = []
    for location, row in located_rows:
        mapped = {}
        for target, source in fields.items():
            if source not in row:
                raise DatasetError(f"{location}: no field {source!r} (mapped to {target!r}); fields: {sorted(row)}")
            value = row[source]
            if not isinstance(value, str) or not value.strip():
                raise DatasetError(f"{location}: field {source!r} must be a non-empty string")
            mapped[target] = value
        out.append(mapped)
    if not out:
        raise DatasetError("the dataset has no rows")
    return out


def check_local_dataset(path: Path, fields: dict | None, key: str, *, preference: bool = False) -> None:
    """Config-time check: the file exists and every row parses and has the mapped fields."""
    from lamdagent.errors import ConfigError

    try:
        _map_rows(_rows_from_file(Path(path)), fields or (PREFERENCE_FIELDS if preference else DEFAULT_FIELDS))
    except DatasetError as err:
        raise ConfigError(f"{key}.path", str(err)) from None


def prepare(spec: dict, out_path: str | Path, *, task_train_files: list[str | Path] = ()) -> dict:
    """Write the rows of one dataset (prompt/completion, or prompt/chosen/rejected for kind
    ``preference``) and return its entry (sha256, rows)."""
    source = spec["source"]
    fields = spec.get("fields") or default_fields(spec)
    if source == "embedded":
        if spec.get("kind") == "preference":
            from lamdagent.data.tasks import preference_rows

            per_task = [preference_rows(read_jsonl(path)) for path in task_train_files]
        else:
            per_task = [[{"prompt": r["prompt"], "completion": r["completion"]} for r in read_jsonl(path)]
                        for path in task_train_files]
        # Interleaved task by task, so that `max_examples` keeps the mix of a multi-task dataset.
        rows = [row for group in itertools.zip_longest(*per_task) for row in group if row is not None]
    elif source == "local":
        rows = _map_rows(_rows_from_file(Path(spec["path"])), fields)
    elif source == "hub":
        from datasets import load_dataset

        hub = load_dataset(spec["repo"], spec.get("name"), split=spec.get("split", "train"), revision=spec.get("revision"))
        rows = _map_rows(((f"{spec['repo']} row {i}", dict(row)) for i, row in enumerate(hub)), fields)
    else:
        raise DatasetError(f"unknown dataset source {source!r}")
    if spec.get("max_examples"):
        rows = rows[: spec["max_examples"]]
    write_jsonl(out_path, rows)
    return dataset_entry(out_path)


def resize(spec: dict, rows: int, out_path: str | Path, *, task_train_files: list[str | Path] = ()) -> dict:
    """The first ``rows`` examples of a dataset's source, for a data-size replay.

    Generated task files are prefixes of each other, so an embedded dataset resized to its own size
    is the exploration's file again; ``task_train_files`` must hold ``per_task_examples`` rows each.
    """
    entry = prepare({**spec, "max_examples": rows}, out_path, task_train_files=task_train_files)
    if entry["rows"] != rows:
        raise DatasetError(f"{spec.get('path') or spec.get('repo') or 'the source'} has {entry['rows']} rows, "
                           f"fewer than the {rows} the scaling study asks for")
    return entry


def per_task_examples(spec: dict, rows: int) -> int:
    """Training examples per generated task that an embedded dataset of ``rows`` rows interleaves."""
    return -(-rows // len(spec["tasks"]))


def dataset_entry(path: str | Path) -> dict:
    return {"sha256": sha256_file(path), "rows": len(read_jsonl(path)), "path": str(path)}
