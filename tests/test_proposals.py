"""k proposals per iteration (``proposals_per_iteration``): distinct, new, seeded, all fed to the memory."""

import pytest
from test_agent import GENERALIST, SPECIALIST, Scripted, config, pool, specialist

from lamdagent.agent.memory import summary_memory, update_memory
from lamdagent.agent.plan import dag_recursion_limit, history_entries, iteration_record, step_entries, write_plan
from lamdagent.agent.propose import CallLog, propose, propose_many
from lamdagent.report.figures import binned_scores, step_points
from lamdagent.report.leaderboard import leaderboard_table
from lamdagent.store.fileio import atomic_write_json
from lamdagent.store.recipes import RecipeStore

# Iteration 0 as the workflow records it: the base and the two specialists, sft(base, arith) and
# sft(base, all), whose recipes are therefore known.
INITIAL = [{"iteration": 0, "model": model, "pipeline": name, "status": "done",
            "score": {"s_multi": s, "tasks": {"arith": s}}}
           for model, name, s in (("base", "base", 0.1), (SPECIALIST, "specialist", 0.2), (GENERALIST, "generalist", 0.3))]
# The action space of test_agent's pool: sft 3 models x 2 datasets, TIES (specialist, generalist) both ways.
SPACE = 8


def many(k, replies=None, history=INITIAL, tmp_path=None, iteration=1):
    controller = None if replies is None else Scripted(replies)
    store = RecipeStore(tmp_path)
    specialist(store)
    log = CallLog()
    records = propose_many(k=k, iteration=iteration, config=config(), pool=pool(), history=history,
                           memory="No results yet.", controller=controller, store=store, log=log)
    return records, log, controller


def test_random_controller_proposes_k_distinct_new_recipes_seeded(tmp_path):
    records, log, _ = many(3, tmp_path=tmp_path)
    models = [r["model"] for r in records]
    assert len(set(models)) == 3
    assert not set(models) & {e["model"] for e in INITIAL}  # known recipes are not proposed again
    assert [r["index"] for r in records] == [0, 1, 2] and all(r["iteration"] == 1 for r in records)
    assert all(r["repeat_of"] is None and r["rejected"] == 0 for r in records)
    assert all((tmp_path / f"{m}.json").is_file() for m in models)  # each recipe saved: a file target
    again, _, _ = many(3, tmp_path=tmp_path)
    assert [r["model"] for r in again] == models
    other, _, _ = many(3, tmp_path=tmp_path, iteration=2)
    assert [r["model"] for r in other] != models


def test_fewer_than_k_when_fewer_new_recipes_remain_then_one_flagged_repeat(tmp_path):
    records, _, _ = many(SPACE, tmp_path=tmp_path)
    assert len(records) == SPACE - 2 == len({r["model"] for r in records})  # the two specialists are known
    history = INITIAL + [dict(r, status="done", score={"s_multi": 0.5, "tasks": {"arith": 0.5}}) for r in records]
    exhausted, _, _ = many(3, history=history, tmp_path=tmp_path, iteration=2)
    assert len(exhausted) == 1 and exhausted[0]["repeat_of"] is not None


def test_k_1_is_the_paper_propose_with_its_prompts(tmp_path):
    # [[1, 1]] is sft(base, arith): the specialist's own recipe. With k = 1 (the paper) the whole space
    # is offered, so the choice stands and is flagged as a repeat of iteration 0; k = 2 rejects it.
    (record,), log, controller = many(1, replies=["1", "[[1, 1]]"], tmp_path=tmp_path)
    assert record["model"] == SPECIALIST and record["repeat_of"] == 0
    assert record["fallback"] == {"type_selection": False, "object_selection": False}
    assert "index" not in record and "rejected" not in record
    assert [c["kind"] for c in log.calls] == ["type_selection", "object_selection"]
    assert "sft: " in controller.prompts[0] and "(6 possible choices)" in controller.prompts[0]  # nothing excluded
    assert not any("in parallel" in p or "Already" in p for p in controller.prompts)
    (first, _), _, parallel = many(2, replies=["1", "[[1, 1]]", "[[3, 2]]", "1", "[[2, 2]]"], tmp_path=tmp_path)
    assert first["model"] != SPECIALIST and first["rejected"] == 1
    assert "(4 possible choices)" in parallel.prompts[0]  # the two specialists' recipes are built already


def test_later_choices_are_told_what_was_chosen_and_duplicates_are_rejected(tmp_path):
    # Choice 1: sft(specialist, all). Choice 2 names it twice (rejected), then the seeded fallback.
    records, log, controller = many(2, ["1", "[[2, 2]]", "1", "[[2, 2]]", "2, 2]]"], tmp_path=tmp_path)
    first, second = records
    assert first["pipeline"] == "sft(specialist, all)" and first["fallback"]["object_selection"] is False
    assert second["model"] != first["model"] and second["action"] == "sft"
    assert second["fallback"] == {"type_selection": False, "object_selection": True}
    assert second["rejected"] == 2 and first["rejected"] == 0
    assert [c["kind"] for c in log.calls] == ["type_selection", "object_selection", "type_selection",
                                              "object_selection", "object_selection"]
    assert first["calls"]["calls"] == 2 and second["calls"]["calls"] == 3  # each choice's own calls
    type_2, objects_2 = controller.prompts[2], controller.prompts[3]
    assert "this is choice 2 of 2" in type_2 and "Already chosen this iteration: sft(specialist, all, 1e-05)." in type_2
    assert "1. sft: " in type_2 and "(3 possible choices)" in type_2  # 6 SFTs, 2 built, 1 chosen
    assert "Already chosen this iteration: sft(specialist, all, 1e-05)." in objects_2
    assert "Already built: sft(base, arith, 1e-05); sft(base, all, 1e-05)." in objects_2
    assert "for a new combination" in controller.prompts[4]
    assert "this is choice 1 of 2" in controller.prompts[0] and "Already chosen" not in controller.prompts[0]


def test_a_known_recipe_is_rejected_and_asked_again(tmp_path):
    # [[1, 1]] is sft(base, arith): the specialist's recipe, built already.
    (first, second), log, _ = many(2, ["1", "[[1, 1]]", "3, 2]]", "2", "[[2, 3]]"], tmp_path=tmp_path)
    assert first["pipeline"] == "sft(generalist, all)" and first["rejected"] == 1
    assert first["fallback"] == {"type_selection": False, "object_selection": False}
    assert second["action"] == "ties_merging" and second["rejected"] == 0


def test_unusable_replies_fall_back_to_distinct_seeded_choices(tmp_path):
    replies = ["no idea"] * 40
    records, _, _ = many(4, replies, tmp_path=tmp_path)
    assert len({r["model"] for r in records}) == 4
    assert all(r["fallback"] == {"type_selection": True, "object_selection": True} for r in records)
    assert not {r["model"] for r in records} & {SPECIALIST, GENERALIST}
    again, _, _ = many(4, replies, tmp_path=tmp_path)
    assert [r["model"] for r in again] == [r["model"] for r in records]


def test_all_k_results_feed_one_memory_rewrite(tmp_path):
    records, _, _ = many(2, tmp_path=tmp_path)
    done = [dict(r, status="done", score={"s_multi": 0.4 + i, "tasks": {"arith": 0.4 + i}}) for i, r in enumerate(records)]
    controller = Scripted(["Both helped; merge them next."])
    text, fallback = update_memory(config=config(), memory="old", history=INITIAL, new=done, controller=controller,
                                   log=CallLog())
    assert text.startswith("Both helped") and fallback is False
    prompt = controller.prompts[0]
    assert "New results (iteration 1, 2 actions run in parallel):" in prompt
    assert all(f"- {r['name']} = {r['pipeline']}: score" in prompt for r in done)  # m1.1, m1.2
    summary = summary_memory(INITIAL, done)
    assert all(r["pipeline"] in summary for r in done) and "1.400" in summary


def test_plan_leaderboard_and_history_have_one_entry_per_model(tmp_path):
    records, _, _ = many(3, tmp_path=tmp_path / "recipes")
    agent = tmp_path / "agent"
    atomic_write_json(agent / "iter_0" / "step.json", {"iteration": 0, "initial": INITIAL})
    proposed = iteration_record(1, [dict(r, status="proposed") for r in records], 3)
    atomic_write_json(agent / "iter_1" / "proposal.json", proposed)
    plan = write_plan(agent, tmp_path / "plan.yaml")
    assert [(s["iteration"], s["index"], s["status"]) for s in plan["steps"]] == [(1, i, "proposed") for i in range(3)]
    done = [dict(r, status="done", score={"s_multi": 0.5 + i, "tasks": {"arith": 0.5 + i}}) for i, r in enumerate(records)]
    step = iteration_record(1, done, 3, calls_memory={"calls": 0})
    atomic_write_json(agent / "iter_1" / "step.json", step)
    plan = write_plan(agent, tmp_path / "plan.yaml")
    assert [s["model"] for s in plan["steps"]] == [r["model"] for r in records]
    assert [s["score"] for s in plan["steps"]] == pytest.approx([0.5, 1.5, 2.5])
    assert [e["model"] for e in history_entries({"iteration": 0, "initial": INITIAL}, [step])][3:] == \
        [r["model"] for r in records]
    board = leaderboard_table([{"iteration": 0, "initial": INITIAL}, step])
    assert len(board) == 6 and list(board["model"][:3]) == [r["model"] for r in reversed(records)]
    assert set(board[board["iteration"] == 1]["model"]) == {r["model"] for r in records}
    assert step_entries(done[0]) == [done[0]]  # a k = 1 record is its own single entry
    points = step_points([{"iteration": 0, "initial": INITIAL}, step])
    assert list(points["iteration"]) == [1, 1, 1] and list(points["s_multi"]) == pytest.approx([0.5, 1.5, 2.5])
    assert binned_scores(points, 5)["n"].tolist() == [3]


def test_transformers_controller_on_the_tiny_model_gives_k_distinct_new_steps(tmp_path, tiny_model_dir):
    """The in-process controller (no API): a random tiny Llama's replies are parsed, rejected or replaced."""
    from lamdagent.agent.controller import make_controller

    controller = make_controller({"type": "transformers"}, model_dir=str(tiny_model_dir), seed=7)
    store = RecipeStore(tmp_path)
    specialist(store)
    log = CallLog()
    records = propose_many(k=3, iteration=1, config=config(), pool=pool(), history=INITIAL, memory="No results yet.",
                           controller=controller, store=store, log=log)
    assert len({r["model"] for r in records}) == 3 and not {r["model"] for r in records} & {SPECIALIST, GENERALIST}
    assert sum(r["calls"]["calls"] for r in records) == len(log.calls) >= 3
    rounds = [c["prompt"] for c in log.calls if c["kind"] == "type_selection" and c["attempt"] == 0]
    assert [f"this is choice {i} of 3" in p for i, p in enumerate(rounds, start=1)] == [True] * 3
    assert all(c["reply"] is not None and c["tokens_out"] > 0 for c in log.calls)


# ---- end to end -------------------------------------------------------------------------------


def job_intervals(log_text: str) -> dict[str, tuple[int, int, str, str]]:
    """Per job output (its first): (position of its start, of its finish, start time, finish time) in
    Snakemake's log, whose blocks read ``[date]``, ``(local)rule NAME:``, ``output: ...``, ``jobid: N``
    and, when it is done, ``[date]`` ``Finished jobid: N``."""
    import re

    starts, ends, output, stamp, current = {}, {}, {}, None, None
    for position, line in enumerate(log_text.splitlines()):
        line = line.strip()
        if re.match(r"^\[\w{3} \w{3} +\d+ [\d:]+ \d{4}\]$", line):
            stamp = line[1:-1]
        elif line.startswith("output: "):
            current = line.removeprefix("output: ").split(",")[0]
        elif m := re.match(r"^jobid: (\d+)$", line):
            starts[m.group(1)], output[m.group(1)] = (position, stamp), current
        elif m := re.match(r"^Finished job(?:id:)? (\d+)", line):
            ends[m.group(1)] = (position, stamp)
    return {output[j]: (starts[j][0], ends[j][0], starts[j][1], ends[j][1]) for j in starts if j in ends}


@pytest.mark.slow
def test_k_3_models_of_an_iteration_are_built_at_the_same_time(tmp_path, tiny_model_dir):
    import time

    import yaml
    from e2e import run_snakemake, tiny_config, write_tiny_config

    base = tiny_config(tiny_model_dir)
    workdir = tmp_path / "run"
    # One specialist, SFT only: 6 actions, of which sft(tiny, arith) is the specialist's (known) recipe.
    config = write_tiny_config(
        workdir, tiny_model_dir, iterations=1, proposals_per_iteration=3,
        models={name: base["models"][name] for name in ("tiny", "specialist-arith")},
        objects=dict(base["objects"], models=["tiny", "specialist-arith"]),
        action_types={"sft": base["action_types"]["sft"]})
    started = time.monotonic()
    # The leaderboard is the last target that reads the agent's steps (the report adds test evaluations).
    result = run_snakemake(workdir, config, "--cores", "3", "results/leaderboard.tsv", timeout=600)
    elapsed = time.monotonic() - started

    proposal = yaml.safe_load((workdir / "results/agent/iter_1/proposal.json").read_text())
    models = [entry["model"] for entry in proposal["steps"]]
    assert len(set(models)) == 3 and [entry["index"] for entry in proposal["steps"]] == [0, 1, 2]
    plan = yaml.safe_load((workdir / "results/plan.yaml").read_text())
    assert [(s["iteration"], s["index"], s["model"]) for s in plan["steps"]] == [(1, i, m) for i, m in enumerate(models)]
    specialist = next(e["model"] for e in plan["initial"] if e["name"] == "specialist-arith")
    assert specialist not in models  # its recipe is known: not proposed again
    for step in plan["steps"]:
        score = yaml.safe_load((workdir / "results/scores" / f"{step['model']}.json").read_text())
        assert step["status"] == "done" and step["score"] == pytest.approx(score["s_multi"], abs=1e-6)
    step = yaml.safe_load((workdir / "results/agent/iter_1/step.json").read_text())
    memory = (workdir / "results/agent/iter_1/memory.md").read_text()
    assert all(entry["pipeline"] in memory for entry in step["steps"])  # all three fed the memory
    board = (workdir / "results/leaderboard.tsv").read_text()
    assert all(m in board for m in models)

    # Snakemake started the three SFT jobs before any of them finished: they ran at the same time.
    jobs = job_intervals(result.stdout)
    built = [jobs[f"results/models/{m}"] for m in models]
    print(f"k = 3 run: {elapsed:.0f} s; the iteration's SFT jobs (start, finish): {[b[2:] for b in built]}")
    assert max(b[0] for b in built) < min(b[1] for b in built), built


def test_dag_recursion_limit_grows_with_the_plan_and_never_lowers_the_current_one():
    assert dag_recursion_limit(0, 1000) == 1000
    assert dag_recursion_limit(300, 1000) >= 1000 + 4 * 300  # ~4 frames per iteration are used
    assert dag_recursion_limit(1000, 1000) > dag_recursion_limit(300, 1000)
    assert dag_recursion_limit(10, 50_000) == 50_000
