"""Kill an exploration of the tiny model with SIGKILL at random moments, resume it, check nothing broke.

Each run is ``lamdagent unlock-stale`` then ``snakemake`` (what ``make demo`` does), killed (the whole
process group: Snakemake and its jobs) a seeded-random number of seconds after it starts; then a
last run finishes the exploration. After every kill the results directory is checked:

- every model directory that exists is complete (config, weights, recipe, lineage, card; the
  weights hash to what the lineage records) and no model was built from a parent other than the
  complete one (the parents' hashes in its lineage are the parents' own);
- every finished step names a complete model and the score on disk;

and at the end: ``plan.yaml`` agrees with the steps, the model directories and the scores, no
staging directory is left, no recipe was trained to completion twice, and a rerun has nothing to do.

Every other run is killed that long after its first job finished rather than after its start, so
the kills reach every stage of the exploration and land right after job completions.

    python benchmarks/kill_test.py --kills 20          # prints kills, reruns finished, corrupt models, ...

``tests/test_kill.py`` runs the same function.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from e2e import run_snakemake, snakemake_command, subprocess_env, tiny_config  # noqa: E402

from lamdagent.actions.registry import is_built_id
from lamdagent.agent.plan import step_entries  # noqa: E402
from lamdagent.lineage.prune import is_pruned  # noqa: E402
from lamdagent.lineage.records import LINEAGE_FILE, hash_files
from lamdagent.lineage.tree import weight_files  # noqa: E402
from lamdagent.store.fileio import read_json  # noqa: E402
from lamdagent.store.recipes import model_id  # noqa: E402

LAMDAGENT = str(Path(sys.executable).with_name("lamdagent"))
MODEL_RULES = ("sft", "ties_merging")


def kill_config(tiny_model_dir: Path, iterations: int = 1) -> dict:
    """The e2e tiny config with one specialist: a chain (base -> specialist -> agent's step) in few jobs."""
    config = tiny_config(tiny_model_dir, iterations=iterations)
    del config["models"]["specialist-choice"]
    config["objects"]["models"] = ["tiny", "specialist-arith"]
    return config


def final_target(iterations: int) -> str:
    """The last step of the exploration (the report is not what this test is about)."""
    return f"results/agent/iter_{iterations}/step.json"


# ---- checks -----------------------------------------------------------------------------------


def _weights_of(model_dir: Path) -> dict[str, str]:
    """sha256 of a model directory's weights: the lineage's record when there is one, else the files."""
    lineage = model_dir / LINEAGE_FILE
    if lineage.is_file():
        return weight_files(read_json(lineage)["files"])
    return weight_files(hash_files(model_dir))


def model_problems(results: Path, local_models: dict[str, Path]) -> list[str]:
    """Every way a model directory on disk is incomplete or was built from something else."""
    problems = []
    models = results / "models"
    for model_dir in sorted(models.iterdir()) if models.is_dir() else []:
        name = model_dir.name
        if name.startswith("."):
            continue  # a killed job's staging directory: no rule reads it
        missing = [f for f in ("config.json",) if not (model_dir / f).is_file()]
        pruned = is_pruned(model_dir)  # keep_top_k removed the weights on purpose
        on_disk = weight_files(hash_files(model_dir))
        if not on_disk and not pruned:
            missing.append("weights")
        if is_built_id(name):
            missing += [f for f in ("recipe.json", LINEAGE_FILE, "README.md") if not (model_dir / f).is_file()]
        if missing:
            problems.append(f"{name}: incomplete, lacks {missing}")
            continue
        if not is_built_id(name):
            continue
        lineage = read_json(model_dir / LINEAGE_FILE)
        if model_id(read_json(model_dir / "recipe.json")) != name or lineage["model"] != name:
            problems.append(f"{name}: recipe or lineage of another model")
        if not pruned and weight_files(lineage["files"]) != on_disk:
            problems.append(f"{name}: weights differ from its lineage")
        for slot, parent in lineage["parents"].items():
            parent_dir = local_models.get(parent["model"], models / parent["model"])
            if not parent_dir.is_dir():
                problems.append(f"{name}: parent {slot}={parent['model']} is gone")
            elif weight_files(parent["files"]) != _weights_of(parent_dir):
                problems.append(f"{name}: built from other weights of {parent['model']} than those on disk")
    return problems


def step_problems(results: Path, local_models: dict[str, Path]) -> list[str]:
    """Every finished step (and initial model) must name a complete model and the score on disk."""
    problems = []
    for step_path in sorted((results / "agent").glob("iter_*/step.json")):
        for entry in step_entries(read_json(step_path)):
            model = entry["model"]
            if model not in local_models and not (results / "models" / model / "config.json").is_file():
                problems.append(f"{step_path.parent.name}: model {model} has no directory")
            score_path = results / "scores" / f"{model}.json"
            if entry.get("status") == "done":
                if not score_path.is_file():
                    problems.append(f"{step_path.parent.name}: {model} done without a score file")
                elif read_json(score_path)["s_multi"] != entry["score"]["s_multi"]:
                    problems.append(f"{step_path.parent.name}: {model} score differs from {score_path.name}")
    for proposal in sorted((results / "agent").glob("iter_*/proposal.json")):
        for entry in step_entries(read_json(proposal)):
            if not (results / "recipes" / f"{entry['model']}.json").is_file():
                problems.append(f"{proposal.parent.name}: proposed {entry['model']} without a recipe")
    return problems


def plan_problems(results: Path, iterations: int, local_models: dict[str, Path]) -> list[str]:
    """plan.yaml against the step records, the model directories and the scores (a finished run)."""
    problems = step_problems(results, local_models)
    plan = yaml.safe_load((results / "plan.yaml").read_text())
    expected = [(i, e["model"]) for i in range(1, iterations + 1)
                for e in step_entries(read_json(results / "agent" / f"iter_{i}" / "step.json"))]
    shown = [(s["iteration"], s["model"]) for s in plan["steps"]]
    if shown != expected:
        problems.append(f"plan.yaml steps {shown} != step.json records {expected}")
    initial = step_entries(read_json(results / "agent" / "iter_0" / "step.json"))
    if [e["model"] for e in plan["initial"]] != [e["model"] for e in initial]:
        problems.append("plan.yaml initial models differ from iter_0/step.json")
    for entry in plan["initial"] + plan["steps"]:
        score = read_json(results / "scores" / f"{entry['model']}.json")["s_multi"]
        if entry["score"] is None or abs(entry["score"] - score) > 1e-6:
            problems.append(f"plan.yaml: {entry['model']} score {entry['score']} != {score}")
        if entry.get("status", "done") != "done":
            problems.append(f"plan.yaml: {entry['model']} is {entry['status']} in a finished run")
    return problems


def _stage(results: Path) -> str:
    """How far the exploration was when killed: models built, evaluations, agent records."""
    models = [p for p in (results / "models").glob("*") if not p.name.startswith(".")] if results.is_dir() else []
    evals = list(results.glob("evals/*/*.json"))
    records = list(results.glob("agent/iter_*/*.json"))
    return f"{len(models)}m {len(evals)}e {len(records)}a"


def completions(results: Path) -> dict[str, int]:
    """How many times each built model's job ran to its end (the rule logs are appended to)."""
    counts = {}
    for rule in MODEL_RULES:
        for log in (results / "logs" / rule).glob("*.log"):
            counts[f"{rule}-{log.stem}"] = log.read_text(errors="replace").count(f"[lamdagent] {rule} finished")
    return counts


# ---- running ----------------------------------------------------------------------------------


FINISHED = "Finished jobid"  # Snakemake's line once a job's outputs are checked and recorded


def _wait_for_a_finished_job(process: subprocess.Popen, log_path: Path, offset: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        with open(log_path, errors="replace") as handle:
            handle.seek(offset)
            if FINISHED in handle.read():
                return
        time.sleep(0.2)


def run_until(workdir: Path, config_path: Path, target: str, kill_after_s: float, log, *,
              after_a_job: bool = False) -> bool:
    """One resume (unlock-stale, then snakemake), SIGKILLed with its jobs ``kill_after_s`` after it
    starts or, with ``after_a_job``, after its first job finished (so kills reach every stage of
    the run, not only its first seconds, and land right after job completions).

    True if it was killed, False if it ended first (then it must have succeeded)."""
    subprocess.run([LAMDAGENT, "unlock-stale", "--directory", str(workdir)], check=True, stdout=log,
                   stderr=subprocess.STDOUT)
    log.flush()
    offset = os.path.getsize(log.name)
    env = dict(subprocess_env(), PYTHONUNBUFFERED="1")  # what it printed before the kill stays in the log
    process = subprocess.Popen(snakemake_command(workdir, config_path, target), cwd=workdir, env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if after_a_job:
        _wait_for_a_finished_job(process, Path(log.name), offset, timeout=600)
    try:
        process.wait(timeout=kill_after_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return True
    if process.returncode != 0:
        raise AssertionError(f"a resumed run failed ({process.returncode}); see {log.name}")
    return False


@dataclass
class KillReport:
    kills: int = 0
    reruns: int = 0
    reruns_finished: int = 0
    corrupt_models: list[str] = field(default_factory=list)
    plan_mismatches: list[str] = field(default_factory=list)
    retrained: dict[str, int] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)
    nothing_to_do: bool = False
    kill_moments_s: list[float] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)
    steps_resumed: int = 0
    iterations: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        return [
            f"kills: {self.kills} (at {', '.join(f'{t:.1f}' for t in self.kill_moments_s)} s after the start, "
            f"or after the first finished job, of each run)",
            f"progress at each kill: {' | '.join(self.stages)}",
            f"reruns finished: {self.reruns_finished} of {self.reruns} reruns after a kill"
            + (f" ({self.steps_resumed} finished before their kill and got one more iteration)"
               if self.steps_resumed else ""),
            f"corrupt models: {len(self.corrupt_models)}",
            f"plan mismatches: {len(self.plan_mismatches)}",
            f"recipes trained to completion twice: {len(self.retrained)}",
            f"staging directories left: {len(self.leftovers)}",
            f"rerun of the finished workflow has nothing to do: {self.nothing_to_do}",
            f"iterations explored: {self.iterations}; seconds: {self.seconds:.0f}",
        ]


def kill_test(workdir: Path, tiny_model_dir: Path, *, kills: int = 20, seed: int = 0, min_s: float = 0.5,
              max_s: float = 6.0, iterations: int = 1, final_timeout: float = 900) -> KillReport:
    started = time.monotonic()
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "config.yaml"

    def configure(iterations: int) -> str:
        config_path.write_text(yaml.safe_dump(kill_config(tiny_model_dir, iterations), sort_keys=False))
        return final_target(iterations)

    target = configure(iterations)
    results = workdir / "results"
    local = {"tiny": tiny_model_dir}
    report = KillReport()
    with open(workdir / "runs.log", "a") as log:
        while report.kills < kills:
            moment = rng.uniform(min_s, max_s)
            # Every other run is let through one finished job first: the kills walk along the run.
            after_a_job = report.kills % 2 == 1
            report.reruns += report.kills > 0
            if not run_until(workdir, config_path, target, moment, log, after_a_job=after_a_job):
                # Finished before its kill (how far a run gets depends on the machine's speed): one
                # more iteration, as a user raising `iterations` does, and the kills go on.
                report.reruns_finished += report.kills > 0
                report.steps_resumed += 1
                iterations += 1
                target = configure(iterations)
                continue
            report.kills += 1
            report.kill_moments_s.append(moment)
            report.stages.append(_stage(results))
            report.corrupt_models += [f"after kill {report.kills}: {p}" for p in model_problems(results, local)]
            report.plan_mismatches += [f"after kill {report.kills}: {p}" for p in step_problems(results, local)]
    subprocess.run([LAMDAGENT, "unlock-stale", "--directory", str(workdir)], check=True, capture_output=True)
    report.reruns += 1
    run_snakemake(workdir, config_path, target, timeout=final_timeout)
    report.reruns_finished += 1
    report.corrupt_models += model_problems(results, local)
    report.plan_mismatches += plan_problems(results, iterations, local)
    report.iterations = iterations
    report.retrained = {model: n for model, n in completions(results).items() if n > 1}
    report.leftovers = sorted(p.name for p in (results / "models").iterdir() if p.name.startswith("."))
    dry = run_snakemake(workdir, config_path, target, "--dry-run", timeout=300)
    report.nothing_to_do = "Nothing to be done" in dry.stdout
    report.seconds = time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-s", type=float, default=0.5, help="earliest kill, seconds after a run starts")
    parser.add_argument("--max-s", type=float, default=6.0, help="latest kill, seconds after a run starts")
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--workdir", type=Path, help="default: a fresh temporary directory")
    args = parser.parse_args(argv)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lamdagent-kill-"))
    from lamdagent.actions.models import build_tiny_llama

    tiny = workdir / "tiny-llama"
    if not (tiny / "config.json").is_file():
        build_tiny_llama(tiny)
    report = kill_test(workdir / "run", tiny, kills=args.kills, seed=args.seed, min_s=args.min_s, max_s=args.max_s,
                       iterations=args.iterations)
    print("\n".join(report.lines()))
    for problem in report.corrupt_models + report.plan_mismatches:
        print("  ", problem)
    ok = not (report.corrupt_models or report.plan_mismatches or report.retrained or report.leftovers)
    return 0 if ok and report.nothing_to_do else 1


if __name__ == "__main__":
    sys.exit(main())
