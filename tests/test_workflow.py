"""End to end: the real workflow on a tiny random Llama (SFT with trl, TIES with mergekit, lm-eval)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from e2e import SNAKEMAKE, run_snakemake, snakemake_command, subprocess_env, tiny_config, write_tiny_config

LAMDAGENT = str(Path(sys.executable).with_name("lamdagent"))


def model_files(workdir: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every finished model's weights: a retrained model gets new ones."""
    out = {}
    for weights in (workdir / "results" / "models").glob("*/model.safetensors"):
        stat = weights.stat()
        out[weights.parent.name] = (stat.st_ino, stat.st_mtime_ns)
    return out


def finished_counts(workdir: Path) -> dict[str, int]:
    counts = {}
    for rule in ("sft", "ties_merging"):
        for log in (workdir / "results" / "logs" / rule).glob("*.log"):
            counts[f"{rule}-{log.stem}"] = log.read_text().count(f"[lamdagent] {rule} finished")
    return counts


def check_plan_agrees_with_results(workdir: Path, iterations: int, local_models: set[str]) -> dict:
    plan = yaml.safe_load((workdir / "results" / "plan.yaml").read_text())
    assert [step["iteration"] for step in plan["steps"]] == list(range(1, iterations + 1))
    for entry in plan["initial"] + plan["steps"]:
        model = entry["model"]
        if model not in local_models:
            assert (workdir / "results" / "models" / model / "config.json").is_file(), model
            assert (workdir / "results" / "models" / model / "recipe.json").is_file() or "-" not in model
        score = yaml.safe_load((workdir / "results" / "scores" / f"{model}.json").read_text())
        assert entry["score"] == pytest.approx(score["s_multi"], abs=1e-6)
    for step in plan["steps"]:
        assert step["status"] == "done" and step["controller"]
    return plan


def test_bad_config_stops_before_any_job_with_one_line(tmp_path, tiny_model_dir):
    config = write_tiny_config(tmp_path, tiny_model_dir)
    data = yaml.safe_load(config.read_text())
    data["action_types"]["sft"] = ["models", "no_such_objects", "sft_lr"]
    config.write_text(yaml.safe_dump(data))
    result = run_snakemake(tmp_path, config, check=False, timeout=120)
    assert result.returncode != 0
    assert "config: action_types.sft[1]: unknown object type 'no_such_objects'" in result.stdout
    assert not (tmp_path / "results").exists()


def job_count(dry_run_output: str, rule: str) -> int:
    """The count of ``rule`` in a dry run's job stats table (0 when absent)."""
    match = re.search(rf"^{rule}\s+(\d+)$", dry_run_output, flags=re.MULTILINE)
    return int(match.group(1)) if match else 0


def test_a_long_plan_builds_its_dag(tmp_path, tiny_model_dir):
    """Each iteration depends on the one before, and Snakemake's DAG build recurses along that chain:
    with Python's default recursion limit a 300-iteration plan stopped at ~240 (RecursionError)."""
    config = write_tiny_config(tmp_path, tiny_model_dir, iterations=300)
    result = run_snakemake(tmp_path, config, "--dry-run", "results/agent/iter_300/step.json", timeout=300)
    assert "RecursionError" not in result.stdout
    assert job_count(result.stdout, "update_memory") == 300
    # The default target names the plan one iteration at a time: only the first proposal is pending.
    result = run_snakemake(tmp_path, config, "--dry-run", timeout=300)
    assert job_count(result.stdout, "propose") == 1
    assert job_count(result.stdout, "update_memory") == 0


@pytest.mark.slow(seconds=50)
def test_random_exploration_is_killed_resumes_and_continues(tmp_path, tiny_model_dir):
    workdir = tmp_path / "run"
    resources = tiny_config(tiny_model_dir)["resources"]
    resources["evaluate"]["candidate_threads"] = 2
    config = write_tiny_config(workdir, tiny_model_dir, iterations=3, resources=resources)

    # Start, and kill -9 the whole run (Snakemake and its jobs) once the agent's first step is chosen.
    process = subprocess.Popen(snakemake_command(workdir, config), cwd=workdir, env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    proposal = workdir / "results" / "agent" / "iter_1" / "proposal.json"
    deadline = time.monotonic() + 600
    while not proposal.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = model_files(workdir)
    assert before, "no model had finished before the kill"
    assert not any(p.name.endswith(".partial") for p in (workdir / "results" / "models").iterdir()
                   if (p / "model.safetensors").exists() and p.name not in before)

    # The stale lock of the killed run is cleared, then the same command finishes the exploration.
    subprocess.run([LAMDAGENT, "unlock-stale", "--directory", str(workdir)], check=True)
    run_snakemake(workdir, config, timeout=900)
    after = model_files(workdir)
    assert {m: after[m] for m in before} == before, "a model that had finished was rebuilt"
    assert all(count == 1 for count in finished_counts(workdir).values()), finished_counts(workdir)
    plan = check_plan_agrees_with_results(workdir, 3, {"tiny"})
    board = (workdir / "results" / "leaderboard.tsv").read_text().splitlines()
    distinct = {e["model"] for e in plan["initial"] + plan["steps"]}
    assert len(board) == 1 + len(distinct)
    assert board[0].split("\t")[:4] == ["rank", "model", "iteration", "pipeline"]
    topk = (workdir / "results" / "report" / "topk.tsv").read_text().splitlines()
    assert "test_arith_ood" in topk[0] and len(topk) >= 3
    # Model cards gain the scores once known: validation for every built model, test for the top-k.
    for model in distinct - {"tiny"}:
        assert "| task | validation |" in (workdir / "results" / "models" / model / "README.md").read_text()
    for row in topk[1:]:
        model = row.split("\t")[0]
        if model != "tiny":
            assert "| task | validation | test |" in (workdir / "results" / "models" / model / "README.md").read_text()
    for iteration in range(1, 4):
        calls = workdir / "results" / "agent" / f"iter_{iteration}" / "propose_calls.jsonl"
        assert calls.exists()  # the random controller makes no LLM calls, but the record is there
    # An agent step's candidate is validated alone, on candidate_threads; the initial models' and the
    # test evaluations, which run side by side, on threads.
    proposed = {e["model"] for e in plan["steps"]} - {e["model"] for e in plan["initial"]}
    for log in (workdir / "results" / "logs" / "evaluate").glob("*.log"):
        model, split = log.stem.rsplit(".", 1)
        threads = "2 threads" if split == "val" and model in proposed else "1 thread"
        assert f"[lamdagent] evaluate started" in log.read_text() and f" with {threads}\n" in log.read_text(), log
    # Raising `iterations` afterwards: test_raising_iterations_continues_a_finished_exploration.


@pytest.mark.slow
def test_openai_controller_against_a_real_server(tmp_path, tiny_model_dir, openai_server, monkeypatch):
    secret = "sk-lamdagent-test-7f3a9c1e5b2d4680"
    monkeypatch.setenv("LAMDAGENT_TEST_KEY", secret)
    workdir = tmp_path / "run"
    # max_fallback_rate 1: a random tiny model cannot answer, and this test is about the calls, not the choices.
    controller = {"type": "openai", "model": str(tiny_model_dir), "base_url": openai_server,
                  "api_key_env": "LAMDAGENT_TEST_KEY", "temperature": 0, "timeout_s": 60, "max_fallback_rate": 1}
    config = write_tiny_config(workdir, tiny_model_dir, iterations=2, controller=controller)
    run_snakemake(workdir, config, timeout=900)

    plan = check_plan_agrees_with_results(workdir, 2, {"tiny"})
    assert all(step["controller"] == "openai" for step in plan["steps"])
    kinds = []
    for iteration in (1, 2):
        folder = workdir / "results" / "agent" / f"iter_{iteration}"
        calls = [yaml.safe_load(line) for line in (folder / "propose_calls.jsonl").read_text().splitlines()]
        calls += [yaml.safe_load(line) for line in (folder / "memory_calls.jsonl").read_text().splitlines()]
        for call in calls:
            assert call["error"] is None, call["error"]
            assert call["tokens_in"] > 0 and call["latency_s"] > 0 and call["reply"] is not None
            assert call["prompt"]
        kinds += [call["kind"] for call in calls]
    assert {"type_selection", "object_selection", "memory_update"} <= set(kinds)

    # The key's value is nowhere in what the run wrote.
    for root in (workdir / "results", workdir / ".snakemake"):
        for path in root.rglob("*"):
            if path.is_file() and path.stat().st_size < 50_000_000:
                assert secret.encode() not in path.read_bytes(), path


def copy_of_repository(destination: Path) -> Path:
    """The workflow's files as a user's clone has them (no results, no venv, no git)."""
    repo = Path(__file__).resolve().parent.parent
    ignore = shutil.ignore_patterns(".git", ".venv", "results", ".snakemake", "__pycache__", "*.egg-info",
                                    ".pytest_cache")
    shutil.copytree(repo, destination, ignore=ignore)
    return destination


def jobs_run(output: str, rule: str) -> list[str]:
    """The wildcards of every ``rule`` job a (quiet-less) Snakemake run printed, in order."""
    return re.findall(rf"^(?:local)?(?:rule|checkpoint) {rule}:\n(?:    .*\n)*?    wildcards: (.*)$", output,
                      flags=re.MULTILINE)


def step_times(workdir: Path) -> dict[int, int]:
    agent = workdir / "results" / "agent"
    return {int(p.parent.name.split("_")[1]): p.stat().st_mtime_ns for p in agent.glob("iter_*/step.json")}


@pytest.mark.slow(seconds=95)
def test_raising_iterations_continues_a_finished_exploration(tmp_path, tiny_model_dir):
    """The user's path: the repository's own config/config.yaml edited in place, then `make demo` again;
    and every other way to raise the budget (--config, --configfile, k > 1 proposals). After a finished
    run the report files exist, and nothing but `iterations` asks for the new steps."""
    repo = copy_of_repository(tmp_path / "clone")
    config_file = repo / "config" / "config.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, iterations=1), sort_keys=False))
    venv = Path(sys.executable).parent.parent
    # `make demo` as the README says, on the test's own environment (-o: the install step counts as done).
    make_demo = ["make", "-C", str(repo), "demo", f"VENV={venv}", "-o", f"{venv}/.installed-stamp"]

    def run(command: list[str]) -> str:
        result = subprocess.run(command, cwd=repo, env=subprocess_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-8000:]
        return result.stdout

    def continues_to(iterations: int, output: str, before: dict[int, int], models_before: dict) -> None:
        """Only the new iterations were proposed, built, evaluated; the leaderboard and plan show them."""
        proposed = [int(w.split("=")[1]) for w in jobs_run(output, "propose")]
        assert proposed == list(range(max(before) + 1, iterations + 1)), proposed
        assert {i: t for i, t in step_times(repo).items() if i in before} == before, "an earlier step reran"
        assert {m: model_files(repo)[m] for m in models_before} == models_before, "a model was rebuilt"
        plan = yaml.safe_load((repo / "results" / "plan.yaml").read_text())
        assert max(step["iteration"] for step in plan["steps"]) == iterations
        board = pd.read_csv(repo / "results" / "leaderboard.tsv", sep="\t")
        for step in plan["steps"]:
            if step["iteration"] > max(before):
                assert step["status"] == "done"
                assert (repo / "results" / "evals" / step["model"] / "val.json").is_file()
                assert step["model"] in set(board["model"])
        assert board["iteration"].max() == iterations

    run(make_demo)
    assert max(step_times(repo)) == 1
    dry = run([SNAKEMAKE, "-n", "--cores", "2"])
    assert "Nothing to be done" in dry

    # 1. config/config.yaml edited in place, then the same command.
    before, models = step_times(repo), model_files(repo)
    config_file.write_text(config_file.read_text().replace("\niterations: 1\n", "\niterations: 2\n"))
    continues_to(2, run(make_demo), before, models)

    # 2. --config iterations=N on the command line.
    before, models = step_times(repo), model_files(repo)
    continues_to(3, run([SNAKEMAKE, "--cores", "2", "--config", "iterations=3"]), before, models)

    # 3. another config file with a larger budget and 4. k = 2 proposals per iteration.
    other = tmp_path / "longer.yaml"
    other.write_text(yaml.safe_dump({**tiny_config(tiny_model_dir, iterations=4), "proposals_per_iteration": 2}))
    before, models = step_times(repo), model_files(repo)
    output = run([SNAKEMAKE, "--cores", "2", "--configfile", str(other)])
    continues_to(4, output, before, models)
    plan = yaml.safe_load((repo / "results" / "plan.yaml").read_text())
    assert sum(step["iteration"] == 4 for step in plan["steps"]) == 2
    assert "Nothing to be done" in run([SNAKEMAKE, "-n", "--cores", "2", "--configfile", str(other)])

    # Lowering the budget keeps every step on disk; the reports show the first N.
    before = step_times(repo)
    run([SNAKEMAKE, "--cores", "2", "--config", "iterations=2"])
    assert step_times(repo) == before
    board = pd.read_csv(repo / "results" / "leaderboard.tsv", sep="\t")
    assert board["iteration"].max() == 2


@pytest.mark.slow
def test_a_refused_controller_fails_the_run_and_one_that_cannot_answer_stops_it(tmp_path, tiny_model_dir,
                                                                                 openai_server, monkeypatch):
    secret = "sk-lamdagent-test-2b7e91c04d3a5f68"
    monkeypatch.setenv("LAMDAGENT_TEST_KEY", secret)
    workdir = tmp_path / "run"
    # The tiny base alone (no specialists to train first): iteration 0 is one evaluation.
    models = {"tiny": {"source": "local", "path": str(tiny_model_dir)}}
    objects = {"base_models": ["tiny"], "models": ["tiny"], "sft_dataset": ["arith", "choice", "all"],
               "sft_lr": [1.0e-3], "ties_weights": [[0.5, 0.5]], "ties_density": [0.5]}
    controller = {"type": "openai", "model": "no-such-model", "base_url": openai_server,
                  "api_key_env": "LAMDAGENT_TEST_KEY", "timeout_s": 60, "fallback_rate_after": 2}
    config = write_tiny_config(workdir, tiny_model_dir, iterations=2, controller=controller, models=models,
                               objects=objects)
    proposal = workdir / "results" / "agent" / "iter_1" / "proposal.json"

    # A wrong model name: the first question fails the job with the server's words, no random step.
    failed = run_snakemake(workdir, config, timeout=600, check=False)
    assert failed.returncode != 0, failed.stdout[-4000:]
    assert "ControllerRejected" in failed.stdout and "(HTTP 400)" in failed.stdout, failed.stdout[-4000:]
    assert "Server is pinned to" in failed.stdout and "requested 'no-such-model'" in failed.stdout
    assert not proposal.exists() and secret not in failed.stdout

    # The right name, but a random tiny model whose replies never parse: the run stops at the
    # first proposal (2 of 2 questions fell back) instead of running as random search.
    controller["model"] = str(tiny_model_dir)
    config = write_tiny_config(workdir, tiny_model_dir, iterations=2, controller=controller, models=models,
                               objects=objects)
    stopped = run_snakemake(workdir, config, timeout=600, check=False)
    assert stopped.returncode != 0, stopped.stdout[-4000:]
    assert "FallbackRateExceeded" in stopped.stdout, stopped.stdout[-4000:]
    assert "2 of the run's 2 questions to the controller (100%) fell back" in stopped.stdout
    assert "controller.max_fallback_rate (50%)" in stopped.stdout
    message = next(line for line in stopped.stdout.splitlines() if "FallbackRateExceeded: controller:" in line)
    assert "Latest: object_selection: " in message, message  # the last reply the parser could not use
    assert not proposal.exists() and secret not in stopped.stdout
    for root in (workdir / "results", workdir / ".snakemake"):
        for path in root.rglob("*"):
            if path.is_file() and path.stat().st_size < 50_000_000:
                assert secret.encode() not in path.read_bytes(), path
