"""The benchmark scripts' own logic: stage totals and the run's span from Snakemake benchmark files."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from common import read_benchmarks, run_span_s, stage_totals  # noqa: E402

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def write_benchmark(root: Path, relative: str, seconds: float, cpu: float, ended_at: float) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{seconds}\t0:00:00\t10\t20\t5\t6\t0\t0\t1\t{cpu}\n")
    os.utime(path, (ended_at, ended_at))


def test_stage_totals_and_span(tmp_path):
    t0 = 1_000_000.0
    write_benchmark(tmp_path, "sft/aaaa.tsv", 100.0, 90.0, t0 + 100)  # runs t0 .. t0+100
    write_benchmark(tmp_path, "sft/bbbb.tsv", 50.0, 40.0, t0 + 130)  # overlaps the first
    write_benchmark(tmp_path, "evaluate/m.val.tsv", 30.0, 20.0, t0 + 160)
    write_benchmark(tmp_path, "evaluate/m.test.tsv", 10.0, 5.0, t0 + 170)
    write_benchmark(tmp_path, "agent/propose_1.tsv", 2.0, 1.0, t0 + 102)
    (tmp_path / "agent" / "empty.tsv").write_text(HEADER)  # a job still running: no row yet

    totals = stage_totals(read_benchmarks(tmp_path)).set_index("stage")
    assert list(totals.index) == ["action:sft", "evaluate:val", "evaluate:test", "agent:propose"]
    assert totals.loc["action:sft", "jobs"] == 2
    assert totals.loc["action:sft", "wall_s"] == pytest.approx(150.0)
    assert totals.loc["action:sft", "cpu_s"] == pytest.approx(130.0)
    assert totals.loc["evaluate:test", "wall_s"] == pytest.approx(10.0)
    # Two overlapping sft jobs: 192 s of job time in a 170 s span.
    assert run_span_s(tmp_path) == pytest.approx(170.0, abs=1e-3)


def test_span_of_no_jobs_is_zero(tmp_path):
    assert run_span_s(tmp_path) == 0.0


def write_step(agent: Path, iteration: int, record: dict) -> None:
    import json

    (agent / f"iter_{iteration}").mkdir(parents=True, exist_ok=True)
    (agent / f"iter_{iteration}" / "step.json").write_text(json.dumps(record))


def test_best_after_k_iterations(tmp_path):
    from search_efficiency import best_after

    agent = tmp_path / "results" / "agent"
    write_step(agent, 0, {"iteration": 0, "initial": [{"model": "base", "score": {"s_multi": 0.2}},
                                                      {"model": "spec", "score": {"s_multi": 0.5}}]})
    write_step(agent, 1, {"iteration": 1, "model": "m1", "score": {"s_multi": 0.4}})
    write_step(agent, 2, {"iteration": 2, "model": "m2", "status": "failed", "score": None})
    # proposals_per_iteration k = 2: the iteration's record holds both steps.
    write_step(agent, 3, {"iteration": 3, "k": 2, "steps": [{"model": "m3", "score": {"s_multi": 0.9}},
                                                            {"model": "m4", "score": {"s_multi": 0.1}}]})
    assert best_after(tmp_path, [1, 2, 3]) == {1: 0.5, 2: 0.5, 3: 0.9}


def test_models_made_counts_a_repeated_recipe_once_and_no_failed_or_initial_step(tmp_path):
    from search_efficiency import models_made

    agent = tmp_path / "results" / "agent"
    write_step(agent, 0, {"iteration": 0, "initial": [{"model": "spec", "score": {"s_multi": 0.5}}]})
    write_step(agent, 1, {"iteration": 1, "model": "m1", "score": {"s_multi": 0.4}})
    write_step(agent, 2, {"iteration": 2, "model": "m1", "score": {"s_multi": 0.4}})  # the same recipe again
    write_step(agent, 3, {"iteration": 3, "model": "m2", "status": "failed", "score": None})
    write_step(agent, 4, {"iteration": 4, "model": "m3", "score": {"s_multi": 0.1}})
    write_step(agent, 5, {"iteration": 5, "model": "spec", "score": {"s_multi": 0.5}})  # the initial pool's recipe
    assert [models_made(tmp_path, k) for k in (1, 3, 4, 5)] == [1, 1, 2, 2]


def test_fallbacks_count_the_steps_whose_choice_was_not_the_llms(tmp_path):
    from search_efficiency import fallbacks

    agent = tmp_path / "results" / "agent"
    write_step(agent, 0, {"iteration": 0, "initial": [{"model": "spec", "score": {"s_multi": 0.5}}]})
    write_step(agent, 1, {"iteration": 1, "model": "m1", "fallback": {"type_selection": False, "object_selection": True,
                                                                      "memory_update": True}})
    write_step(agent, 2, {"iteration": 2, "model": "m2", "fallback": {"type_selection": True, "object_selection": True}})
    write_step(agent, 3, {"iteration": 3, "model": "m3"})  # the random controller records no fallback
    # k = 2: the iteration's one memory rewrite is flagged on both of its steps, and counted once.
    both = {"type_selection": False, "object_selection": False, "memory_update": True}
    write_step(agent, 4, {"iteration": 4, "k": 2, "steps": [{"model": "m4", "fallback": both},
                                                            {"model": "m5", "fallback": both}]})
    assert fallbacks(tmp_path, 3) == {"steps": 3, "type_selection": 1, "object_selection": 2, "memory_update": 1}
    assert fallbacks(tmp_path, 1) == {"steps": 1, "type_selection": 0, "object_selection": 1, "memory_update": 1}
    assert fallbacks(tmp_path, 4) == {"steps": 5, "type_selection": 1, "object_selection": 2, "memory_update": 2}


def test_repeats_and_the_best_pipeline(tmp_path):
    from search_efficiency import best_pipeline, repeats

    agent = tmp_path / "results" / "agent"
    write_step(agent, 0, {"iteration": 0, "initial": [{"model": "spec", "pipeline": "spec", "score": {"s_multi": 0.5}}]})
    write_step(agent, 1, {"iteration": 1, "model": "m1", "pipeline": "sft(spec, a)", "repeat_of": None,
                          "score": {"s_multi": 0.7}})
    write_step(agent, 2, {"iteration": 2, "model": "m1", "pipeline": "sft(spec, a)", "repeat_of": 1,
                          "score": {"s_multi": 0.7}})
    write_step(agent, 3, {"iteration": 3, "model": "m2", "pipeline": "sft(m1, b)", "status": "failed", "score": None})
    assert [repeats(tmp_path, k) for k in (1, 2, 3)] == [0, 1, 1]
    assert best_pipeline(tmp_path, 0) == "spec"
    assert best_pipeline(tmp_path, 3) == "sft(spec, a)"


def test_action_counts_are_the_steps_per_action_type(tmp_path):
    from search_efficiency import action_counts

    agent = tmp_path / "results" / "agent"
    write_step(agent, 0, {"iteration": 0, "initial": [{"model": "spec", "action": "sft", "score": {"s_multi": 0.5}}]})
    write_step(agent, 1, {"iteration": 1, "model": "m1", "action": "ties"})
    write_step(agent, 2, {"iteration": 2, "k": 2, "steps": [{"model": "m2", "action": "sft"},
                                                            {"model": "m3", "action": "ties"}]})
    write_step(agent, 3, {"iteration": 3, "model": "m4", "action": "ties", "status": "failed"})
    assert action_counts(tmp_path, 3) == {"sft": 1, "ties": 3}  # the initial pool's recipes are not steps
    assert action_counts(tmp_path, 1) == {"ties": 1}


def test_runs_share_the_content_addressed_folders(tmp_path):
    from search_efficiency import share_store

    from lamdagent.studies.baselines import SHARED_DIRS

    store = tmp_path / "store"
    for run in ("random-seed0", "transformers-seed0"):
        share_store(tmp_path / run, store)
        share_store(tmp_path / run, store)  # a rerun keeps the links
    (tmp_path / "random-seed0" / "results" / "models" / "m1").mkdir()
    for name in SHARED_DIRS:
        assert (tmp_path / "transformers-seed0" / "results" / name).resolve() == (store / name).resolve()
    assert (tmp_path / "transformers-seed0" / "results" / "models" / "m1").is_dir()
    assert not (tmp_path / "random-seed0" / "results" / "agent").exists()  # per-run, not shared


def test_each_run_gets_its_own_hard_linked_copy_of_the_store(tmp_path):
    from search_efficiency import clone_store

    from lamdagent.store.fileio import atomic_write_text

    store = tmp_path / "store"
    (store / "models" / "m1").mkdir(parents=True)
    (store / "models" / "m1" / "model.safetensors").write_bytes(b"weights")
    (store / "models" / "m1" / "README.md").write_text("card")
    run = tmp_path / "random-seed0"
    clone_store(run, store)
    weights = run / "results" / "models" / "m1" / "model.safetensors"
    assert weights.read_bytes() == b"weights"
    assert weights.stat().st_ino == (store / "models" / "m1" / "model.safetensors").stat().st_ino  # no bytes copied
    assert not (run / "results" / "models").is_symlink()
    # A run replaces an output whole (the card rewrite, a rebuilt model): the store's copy stays as it was.
    atomic_write_text(run / "results" / "models" / "m1" / "README.md", "card with scores")
    assert (store / "models" / "m1" / "README.md").read_text() == "card"
    # What the run built stays its own; a rerun keeps the run's folders as they are.
    (run / "results" / "models" / "m2").mkdir()
    clone_store(run, store)
    assert (run / "results" / "models" / "m2").is_dir() and not (store / "models" / "m2").exists()
    assert not list((run / "results").glob(".*.cloning"))


def test_per_iteration_overhead_is_each_span_minus_its_jobs(tmp_path):
    from overhead import growth_line, per_iteration_overhead

    bench = tmp_path / "results" / "benchmarks"
    t = 1_000_000.0
    # Three iterations of one chain (propose -> merge -> memory); the orchestration's gaps grow 1, 2, 3 s.
    for i, gap in ((1, 1.0), (2, 2.0), (3, 3.0)):
        for relative, seconds in ((f"agent/propose_{i}.tsv", 2.0), (f"ties_merging/m{i}.tsv", 10.0),
                                  (f"agent/memory_{i}.tsv", 3.0)):
            write_benchmark(bench, relative, seconds, seconds, t + seconds)
            t += seconds + gap / 3
    per_iteration = per_iteration_overhead(tmp_path, 3)
    assert list(per_iteration["job_s"]) == pytest.approx([15.0, 15.0, 15.0])
    # The last iteration ends with its last job: two of its three gaps fall inside it.
    assert list(per_iteration["overhead_s"]) == pytest.approx([1.0, 2.0, 2.0], abs=1e-3)
    line = growth_line(per_iteration)
    assert line["slope_s_per_iteration"] == pytest.approx(0.5, abs=1e-3)
