"""The workflow on a real SLURM cluster, through `--profile profiles/slurm-ci`.

Needs a running cluster (`sbatch`, `sinfo`, and the partition of profiles/slurm-ci up): CI makes
a one-node one with `.ci/slurm-up.sh` and sets LAMDAGENT_REQUIRE_SLURM=1, which turns "no
cluster" from a skip into a failure. Elsewhere these tests skip.

Phase 1 proves the infrastructure with a throwaway workflow; phase 2 runs a 2-iteration
exploration of the tiny model through the real Snakefile and compares it with a local run.
Every Snakemake run is bounded; on time-out it is stopped with SIGINT (Snakemake then scancels
its jobs; SIGTERM would make it wait for them) and the test fails with the log tail.
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from e2e import communicate_bounded

REPO = Path(__file__).resolve().parent.parent
CI_PROFILE = REPO / "profiles" / "slurm-ci"
REQUIRE_SLURM = os.environ.get("LAMDAGENT_REQUIRE_SLURM") == "1"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
# The rules the workflow submits to SLURM; every other rule is a localrule (agent, data, report).
REMOTE_RULES = {"import_model", "sft", "ties_merging", "evaluate"}
AGENT_RULES = {"init_pool", "initial_step", "propose", "update_memory"}
# The tiny model's jobs on the CI node (no GPU, 2 CPUs): no GPU, one CPU, 3000 MB, 20 min, no retry.
CI_RESOURCES = {family: {"gpu": 0, "cpus_per_gpu": 1, "threads": 1, "mem_mb": 3000, "runtime": 20, "retries": 0}
                for family in REMOTE_RULES}

pytestmark = [pytest.mark.slow(seconds=110), pytest.mark.slurm]

# "Job 3 has been submitted with SLURM jobid 17 (log: /.../.snakemake/slurm_logs/rule_sft/<wc>/17.log)."
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+?/rule_(\w+)/.*?\.log)\)")


def ci_partition() -> str:
    profile = yaml.safe_load((CI_PROFILE / "config.yaml").read_text())
    return str(profile["default-resources"]["slurm_partition"])


def cluster_problem() -> str | None:
    """Why no usable SLURM cluster is here (None: there is one)."""
    for tool in ("sbatch", "sinfo", "squeue", "scancel"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not on PATH"
    try:
        proc = subprocess.run(["sinfo", "--noheader", "--format=%P %T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "`sinfo` did not answer in 20 s (is slurmctld running?)"
    if proc.returncode != 0:
        return f"`sinfo` failed: {(proc.stderr or proc.stdout).strip()}"
    partition = ci_partition()
    states = [line.split()[1] for line in proc.stdout.splitlines()
              if len(line.split()) == 2 and line.split()[0].rstrip("*") == partition]
    if not states:
        return f"partition {partition!r} (profiles/slurm-ci) is not in `sinfo`: {proc.stdout.strip()!r}"
    if not any(state.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for state in states):
        return f"no node of partition {partition!r} is up (sinfo states: {', '.join(states)})"
    return None


@pytest.fixture(scope="module")
def slurm_cluster() -> str:
    """The partition to use; skips (or, with LAMDAGENT_REQUIRE_SLURM=1, fails) without a cluster."""
    problem = cluster_problem()
    if problem:
        message = f"no usable SLURM cluster: {problem}. Start one with `.ci/slurm-up.sh` (as root)."
        if REQUIRE_SLURM:
            pytest.fail(f"{message} LAMDAGENT_REQUIRE_SLURM=1 requires it.", pytrace=False)
        pytest.skip(message)
    return ci_partition()


def slurm_command(workdir: Path, *args: str) -> list[str]:
    # --workflow-profile none: a profiles/default next to a Snakefile must not add to profiles/slurm-ci.
    return [SNAKEMAKE, "--profile", str(CI_PROFILE), "--workflow-profile", "none", "--directory", str(workdir), *args]


def cancel_leftovers(output: str) -> list[str]:
    """scancel the jobs of a run that was stopped (its jobs are named after its SLURM run ID)."""
    run_ids = sorted(set(re.findall(r"SLURM run ID: (\S+)", output)))
    for run_id in run_ids:
        subprocess.run(["scancel", "--name", run_id], capture_output=True, timeout=30)
    return run_ids


def run_bounded(command: list[str], cwd: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run Snakemake; past `timeout`, stop it with SIGINT (it scancels its jobs) and fail with the log tail."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    output, timed_out = communicate_bounded(process, timeout)
    if timed_out:
        run_ids = cancel_leftovers(output)
        queue = subprocess.run(["squeue", "--states=all", "--format=%i %T %R %k", f"--name={','.join(run_ids)}"],
                               capture_output=True, text=True) if run_ids else None
        pytest.fail(f"snakemake on SLURM ran past {timeout:.0f} s and was stopped with SIGINT (a status-polling "
                    f"hang: is slurm-status-command squeue and MinJobAge >= 3 x the init delay?).\n"
                    f"squeue (this run's jobs):\n{queue.stdout if queue else '-'}\nlog tail:\n{output[-6000:]}",
                    pytrace=False)
    return subprocess.CompletedProcess(command, process.returncode, output, "")


def submitted_jobs(output: str, workdir: Path) -> list[tuple[str, str, Path]]:
    """(rule, SLURM job id, SLURM log) of every job the run submitted with sbatch."""
    jobs = [(rule, slurm_id, Path(log)) for _, slurm_id, log, rule in SUBMITTED.findall(output)]
    for rule, slurm_id, log in jobs:
        assert log.is_relative_to(workdir.resolve() / ".snakemake" / "slurm_logs"), log
        assert log.name == f"{slurm_id}.log" and f"rule_{rule}" in log.parts, log
    return jobs


def assert_ran_in_slurm(jobs: list[tuple[str, str, Path]]) -> None:
    """Each job's SLURM log exists (slurm-keep-successful-logs) and shows Snakemake ran its rule there."""
    for rule, slurm_id, log in jobs:
        assert log.is_file(), f"no SLURM log {log} for job {slurm_id} of rule {rule}"
        text = log.read_text()
        assert "--executor slurm-jobstep" in text, f"{log} is not the log of a SLURM job step:\n{text[-2000:]}"
        assert re.search(rf"^\s*rule {rule}:", text, re.M), f"{log} did not run rule {rule}:\n{text[-2000:]}"


# ---- phase 1: the infrastructure, with a throwaway workflow ----------------------------------------

THROWAWAY = textwrap.dedent('''
    # Named like the workflow's model rules; as there, the job sizes are the rules' own (the
    # profile sets none): no GPU (the CI node has none), one CPU, 3000 MB, 20 min.
    rule all:
        input: "out/summary.txt"

    rule sft:
        output: "out/sft_{i}.txt"
        threads: 1
        resources:
            gpu=0,
            mem_mb=lambda wildcards, attempt: 3000 * attempt,
            runtime=lambda wildcards, attempt: 20 * attempt,
        shell: "echo rule=sft SLURM_JOB_ID=${{SLURM_JOB_ID:-none}} partition=${{SLURM_JOB_PARTITION:-none}} > {output}"

    rule evaluate:
        input: "out/sft_{i}.txt"
        output: "out/eval_{i}.txt"
        threads: 1
        resources:
            gpu=0,
            mem_mb=3000,
            runtime=20,
        shell: "echo rule=evaluate SLURM_JOB_ID=${{SLURM_JOB_ID:-none}} > {output}"

    rule summarize:
        input: expand("out/eval_{i}.txt", i=[1, 2])
        output: "out/summary.txt"
        localrule: True
        shell: "cat {input} > {output}; echo rule=summarize SLURM_JOB_ID=${{SLURM_JOB_ID:-none}} >> {output}"
''')


def test_throwaway_workflow_goes_through_sbatch(slurm_cluster, tmp_path):
    (tmp_path / "Snakefile").write_text(THROWAWAY)
    # SLURM_* variables of an enclosing job would confuse the plugin; a test never runs inside one.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = run_bounded(slurm_command(tmp_path), tmp_path, timeout=300, env=env)
    output = result.stdout
    assert result.returncode == 0, f"snakemake on SLURM failed ({result.returncode}):\n{output[-8000:]}"
    assert "Falling back to 'sacct'" not in output, "the plugin ignored slurm-status-command: squeue"

    jobs = submitted_jobs(output, tmp_path)
    assert sorted(rule for rule, _, _ in jobs) == ["evaluate", "evaluate", "sft", "sft"], output[-4000:]
    assert_ran_in_slurm(jobs)
    slurm_ids = {slurm_id for _, slurm_id, _ in jobs}
    assert len(slurm_ids) == 4

    # The outputs were written inside those SLURM jobs, in the CI partition; the localrule ran here.
    for i in (1, 2):
        sft = (tmp_path / f"out/sft_{i}.txt").read_text().split()
        assert sft[0] == "rule=sft" and sft[1].removeprefix("SLURM_JOB_ID=") in slurm_ids, sft
        assert sft[2] == f"partition={slurm_cluster}", sft
        evaluation = (tmp_path / f"out/eval_{i}.txt").read_text().split()
        assert evaluation[1].removeprefix("SLURM_JOB_ID=") in slurm_ids, evaluation
    assert (tmp_path / "out/summary.txt").read_text().splitlines()[-1] == "rule=summarize SLURM_JOB_ID=none"
    assert re.search(r"^localrule summarize:", output, re.M)

    # The rules' resources reached sbatch (the profile sets none): no GPU, 3000 MB, 20 min.
    shown = subprocess.run(["scontrol", "show", "job", sorted(slurm_ids)[0]], capture_output=True, text=True)
    if shown.returncode == 0:  # jobs leave slurmctld MinJobAge seconds after they end
        assert "TimeLimit=00:20:00" in shown.stdout and "mem=3000M" in shown.stdout, shown.stdout
        assert "gres/gpu" not in shown.stdout and "JobState=COMPLETED" in shown.stdout, shown.stdout


# ---- phase 2: a 2-iteration exploration through the real Snakefile --------------------------------


def leaderboard_rows(workdir: Path) -> list[dict]:
    with open(workdir / "results" / "leaderboard.tsv", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def agent_files(workdir: Path) -> list[str]:
    """The agent's record (plan steps, proposals, memory, pool) as paths relative to the workdir."""
    root = workdir / "results" / "agent"
    return sorted(str(path.relative_to(workdir)) for path in root.rglob("*") if path.is_file())


def test_exploration_on_slurm_matches_local_run(slurm_cluster, tiny_model_dir, tmp_path):
    from e2e import run_snakemake, write_tiny_config  # tests/e2e.py: the lead's end-to-end helpers

    iterations = 2
    local_dir, slurm_dir = tmp_path / "local", tmp_path / "slurm"
    # Job sizes for the CI node come from the config, as on any cluster (profiles/slurm-ci sets none).
    local_config = write_tiny_config(local_dir, tiny_model_dir, iterations=iterations, controller={"type": "random"},
                                     resources=CI_RESOURCES)
    slurm_config = write_tiny_config(slurm_dir, tiny_model_dir, iterations=iterations, controller={"type": "random"},
                                     resources=CI_RESOURCES)

    # Side by side: the SLURM run waits on the queue and its polls most of the time, the local one computes.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        local = pool.submit(run_snakemake, local_dir, local_config, "--workflow-profile", "none", timeout=1200)
        on_slurm = pool.submit(run_snakemake, slurm_dir, slurm_config, "--profile", str(CI_PROFILE),
                               "--workflow-profile", "none", timeout=1800)
        local.result()
        result = on_slurm.result()
    check_exploration_on_slurm(result.stdout, slurm_dir)
    check_same_shape(local_dir, slurm_dir, iterations)


def check_exploration_on_slurm(output: str, slurm_dir: Path) -> None:
    assert "Falling back to 'sacct'" not in output, "the plugin ignored slurm-status-command: squeue"

    # Model building and evaluation went through sbatch, and ran in SLURM jobs.
    jobs = submitted_jobs(output, slurm_dir)
    submitted_rules = {rule for rule, _, _ in jobs}
    assert submitted_rules <= REMOTE_RULES, f"localrules were submitted: {submitted_rules - REMOTE_RULES}"
    assert "evaluate" in submitted_rules and submitted_rules & {"sft", "ties_merging"}, output[-6000:]
    assert_ran_in_slurm(jobs)

    # The agent ran in the Snakemake process ("localrule <name>:" / "localcheckpoint <name>:"), not via sbatch.
    local_rules = set(re.findall(r"^local(?:rule|checkpoint) (\w+):", output, re.M))
    assert AGENT_RULES <= local_rules, f"agent rules not run locally: {AGENT_RULES - local_rules}"
    for log_dir in (slurm_dir / ".snakemake" / "slurm_logs").glob("rule_*"):
        assert log_dir.name.removeprefix("rule_") in REMOTE_RULES, log_dir


def check_same_shape(local_dir: Path, slurm_dir: Path, iterations: int) -> None:
    """Same results, in shape, as the local run: the same leaderboard columns and rows (the same
    initial pool), the same agent record (one plan step per iteration), as many models and evaluations."""
    local_rows, slurm_rows = leaderboard_rows(local_dir), leaderboard_rows(slurm_dir)
    assert slurm_rows and len(slurm_rows) == len(local_rows), (slurm_rows, local_rows)
    assert list(slurm_rows[0]) == list(local_rows[0])
    initial = sorted(row["model"] for row in local_rows if row["iteration"] == "0")
    assert sorted(row["model"] for row in slurm_rows if row["iteration"] == "0") == initial
    assert agent_files(slurm_dir) == agent_files(local_dir)
    for i in range(iterations + 1):
        assert (slurm_dir / f"results/agent/iter_{i}/step.json").is_file()
    for sub in ("models", "evals", "scores"):
        local_n = len(list((local_dir / "results" / sub).iterdir()))
        assert len(list((slurm_dir / "results" / sub).iterdir())) == local_n, sub
    assert (slurm_dir / "results/report/topk.tsv").is_file()


# ---- evaluation.with_build: a candidate's build and its validation evaluation in one SLURM job -----

# "Job 7 has been submitted with SLURM jobid 21 (log: /.../.snakemake/slurm_logs/group_build_and_evaluate/...)."
SUBMITTED_ANY = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: (.+?/slurm_logs/((?:rule|group)_\w+)/.*?\.log)\)")


def test_with_build_submits_each_build_and_its_evaluation_as_one_job(slurm_cluster, tiny_model_dir, tmp_path):
    from e2e import run_snakemake, write_tiny_config

    workdir = tmp_path / "run"
    config = write_tiny_config(workdir, tiny_model_dir, iterations=2, controller={"type": "random"},
                               resources=CI_RESOURCES)
    settings = yaml.safe_load(config.read_text())
    settings["evaluation"]["with_build"] = True
    # Every SFT the agent chooses diverges (a recorded failure): its evaluation, already in the same
    # job, must record the failure rather than fail the job. The specialists (iteration 0) succeed.
    settings["objects"]["sft_lr"] = [1.0e10]
    settings["action_types"] = {"sft": settings["action_types"]["sft"]}
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    result = run_snakemake(workdir, config, "--profile", str(CI_PROFILE), "--workflow-profile", "none", timeout=1800)
    output = result.stdout

    submitted = [(slurm_id, Path(log), kind) for slurm_id, log, kind in SUBMITTED_ANY.findall(output)]
    kinds = {kind for _, _, kind in submitted}
    # No build went alone: every sft job is a group job (the plugin names its logs' folder after the
    # group and its rules), which ran both rules on the node.
    assert "rule_sft" not in kinds and "group_build_and_evaluate_evaluate_sft" in kinds, sorted(kinds)
    results = workdir / "results"
    plan = yaml.safe_load((results / "plan.yaml").read_text())
    built = [e["model"] for e in plan["initial"] if e["model"].startswith("sft-")] + [s["model"] for s in plan["steps"]]
    logs = {log: log.read_text() for _, log, kind in submitted if kind.startswith("group_build_and_evaluate")}
    for model in built:
        pairs = [text for text in logs.values()
                 if re.search(r"^\s*rule sft:", text, re.M) and f"results/models/{model}" in text
                 and re.search(rf"^\s*rule evaluate:[\s\S]*?wildcards: model={model}, split=val", text, re.M)]
        assert len(pairs) == 1, f"{model}: no single SLURM job ran both its build and its evaluation"
    # The pair's job asks for the larger memory and the sum of the two runtimes (20 + 20 min).
    pair_id = next(slurm_id for slurm_id, _, kind in submitted if kind == "group_build_and_evaluate_evaluate_sft")
    shown = subprocess.run(["scontrol", "show", "job", pair_id], capture_output=True, text=True)
    if shown.returncode == 0:  # jobs leave slurmctld MinJobAge seconds after they end
        assert "TimeLimit=00:40:00" in shown.stdout and "mem=3000M" in shown.stdout, shown.stdout
    # One SLURM job per candidate, not two: the builds of iterations 0-2 and their evaluations (a
    # repeated recipe is built once).
    assert len([log for log, text in logs.items() if "rule sft:" in text]) == len(set(built))

    # The specialists were scored; the diverged steps recorded their failure in the evaluation and
    # were fed back with the failure score, unscored.
    for entry in plan["initial"]:
        assert entry.get("status") != "failed", entry
    assert [s["status"] for s in plan["steps"]] == ["failed", "failed"]
    for step in plan["steps"]:
        evaluation = json.loads((results / "evals" / step["model"] / "val.json").read_text())
        assert evaluation["status"] == "failed" and evaluation["failure"]["kind"] == "diverged", evaluation
        assert not (results / "scores" / f"{step['model']}.json").exists()
    assert (results / "report" / "topk.tsv").is_file()
