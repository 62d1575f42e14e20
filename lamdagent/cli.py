"""``lamdagent`` command line: maintenance commands around the workflow."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _snakemake_running_in(workdir: Path) -> list[int]:
    """PIDs of Snakemake processes whose working directory is ``workdir`` (Linux /proc)."""
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if "snakemake" in cmdline and "unlock-stale" not in cmdline and cwd == workdir:
            found.append(int(entry.name))
    return found


def _parent(pid: int) -> int | None:
    """The parent's PID (Linux /proc): a job's script is a child of the Snakemake that runs it."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def unlock_stale(workdir: Path) -> int:
    """Remove Snakemake's locks if they were left by a killed run (no Snakemake runs here).

    A live run keeps its lock: a second Snakemake on the same results is still refused.
    """
    locks = workdir / ".snakemake" / "locks"
    if not locks.is_dir() or not any(locks.iterdir()):
        return 0
    running = _snakemake_running_in(workdir.resolve())
    if running:
        print(f"a Snakemake run is active here (pid {', '.join(map(str, running))}); its lock is kept",
              file=sys.stderr)
        return 1
    for lock in locks.iterdir():
        lock.unlink()
    print("removed the lock of a run that was killed; the next run resumes it")
    return 0


def lineage(model_dir: Path, *, verify: bool, as_json: bool) -> int:
    """Print a model's lineage tree (or the record as JSON); with ``verify``, re-hash its files."""
    from lamdagent.lineage import cards, records
    from lamdagent.lineage.verify import verify as verify_files

    try:
        record = records.load_lineage(model_dir)
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 2
    if as_json:
        print(cards.dumps(record))
    else:
        print(cards.render_tree(record), end="")
    if not verify:
        return 0
    notes: list[str] = []
    problems = verify_files(model_dir, notes)
    out = sys.stderr if as_json else sys.stdout  # keep stdout parseable JSON
    for note in notes:
        print(f"checked: {note}", file=out)
    for problem in problems:
        print(f"MISMATCH {problem}", file=out)
    print(f"verify: {len(problems)} mismatch(es)", file=out)
    return 1 if problems else 0


def rebuild(model_dir: Path, results: Path) -> int:
    """Make a model again from its lineage in a fresh results directory and compare the weights.

    Exit 1 when a step recorded as bit-reproducible gives other bytes; a step recorded as not
    reproducible (GPU, reduced precision) may differ and is reported as such.
    """
    from lamdagent.lineage import rebuild, records

    try:
        record = records.load_lineage(model_dir)
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 2
    report = rebuild.rebuild(record, results, say=lambda line: print(line, flush=True))
    final = report[-1]
    unexpected = [step["model"] for step in report if step["expected_identical"] and not step["identical"]]
    print(f"final {final['model']}: rebuilt in {final['dir']}: "
          f"{'bit-identical' if final['identical'] else 'weights differ'}")
    if unexpected:
        print(f"not reproduced although recorded as bit-reproducible: {', '.join(unexpected)}")
        return 1
    return 0


def load_configs(paths: list[Path]) -> dict | None:
    """The config as Snakemake merges ``--configfile`` files (later keys win); None if none exists."""
    import yaml

    from lamdagent.config import _merge_defaults

    merged: dict = {}
    found = False
    for path in paths:
        if path.is_file():
            merged = _merge_defaults(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, merged)
            found = True
    return merged if found else None


def status(workdir: Path, configfiles: list[Path] | None, *, as_json: bool) -> int:
    """Where the exploration in ``workdir`` stands: iteration i of N, best so far, last step, time left."""
    import json

    from lamdagent.report import status as st

    if not (workdir / "results").is_dir():
        print(f"{workdir}: no results/ here (run it where you run snakemake, or pass --directory)", file=sys.stderr)
        return 2
    # Relative config paths are read from the workflow directory, as Snakemake does with --directory.
    paths = [path if path.is_absolute() else workdir / path for path in (configfiles or [Path("config/config.yaml")])]
    config = load_configs(paths)
    if config is None:
        print(f"no config at {', '.join(map(str, paths))}: the plan's length is unknown (pass --configfile)",
              file=sys.stderr)
    pids = _snakemake_running_in(workdir.resolve())
    report = st.status(workdir, config, running_pids=[pid for pid in pids if _parent(pid) not in pids])
    print(json.dumps(report, indent=2) if as_json else st.render(report), end="\n" if as_json else "")
    return 0


def check_config(configfiles: list[Path], directory: Path) -> int:
    """Check the config as a run in ``directory`` would read it (its config/config.yaml, then each
    --configfile over it), with no job started. Snakemake reports a YAML syntax error in a
    --configfile without file or line; this names both."""
    from lamdagent import config as cfg

    default = directory / "config" / "config.yaml"
    files = ([default] if default.is_file() else []) + list(configfiles)
    merged: dict = {}
    try:
        for path in files:
            merged = cfg._merge_defaults(cfg.read_config_file(path), merged)  # a later file wins, as in Snakemake
        cfg.load(merged, workdir=directory)
    except cfg.ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"config OK: {', '.join(map(str, files))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lamdagent")
    sub = parser.add_subparsers(dest="command", required=True)
    unlock = sub.add_parser("unlock-stale", help="clear the lock a killed Snakemake run left behind")
    unlock.add_argument("--directory", default=".", type=Path)
    show = sub.add_parser("lineage", help="print how a model was made (its lineage.json)")
    show.add_argument("model_dir", type=Path)
    show.add_argument("--verify", action="store_true", help="re-hash every recorded file; exit 1 on a mismatch")
    show.add_argument("--json", action="store_true", help="print the full record as JSON")
    again = sub.add_parser("rebuild", help="make a model again from its lineage and compare the weights")
    again.add_argument("model_dir", type=Path)
    again.add_argument("--results", required=True, type=Path, help="a fresh results directory")
    where = sub.add_parser("status", help="where an exploration stands: iteration, best so far, last step, time left")
    where.add_argument("--directory", default=".", type=Path, help="the directory holding results/ (snakemake's)")
    where.add_argument("--configfile", nargs="+", type=Path,
                       help="the config(s) the run was given (default config/config.yaml)")
    where.add_argument("--json", action="store_true", help="print the status as JSON, for scripts")
    check = sub.add_parser("check-config", help="check config files (syntax, schema, references) before a run")
    check.add_argument("configfiles", nargs="*", type=Path, help="the files given to snakemake --configfile")
    check.add_argument("--directory", default=".", type=Path)
    args = parser.parse_args(argv)
    if args.command == "unlock-stale":
        return unlock_stale(args.directory)
    if args.command == "lineage":
        return lineage(args.model_dir, verify=args.verify, as_json=args.json)
    if args.command == "status":
        return status(args.directory, args.configfile, as_json=args.json)
    if args.command == "rebuild":
        return rebuild(args.model_dir, args.results)
    if args.command == "check-config":
        return check_config(args.configfiles, args.directory)
    return 2


if __name__ == "__main__":
    sys.exit(main())
