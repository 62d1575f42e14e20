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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lamdagent")
    sub = parser.add_subparsers(dest="command", required=True)
    unlock = sub.add_parser("unlock-stale", help="clear the lock a killed Snakemake run left behind")
    unlock.add_argument("--directory", default=".", type=Path)
    args = parser.parse_args(argv)
    if args.command == "unlock-stale":
        return unlock_stale(args.directory)
    return 2


if __name__ == "__main__":
    sys.exit(main())
