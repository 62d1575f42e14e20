"""The synthetic tasks, and their lm-eval YAMLs scored with lm-eval's own filters and metric."""

from __future__ import annotations

import re

import pytest

from lamdagent.data.tasks import SPLITS, TASKS, generate, write_splits
from lamdagent.store.fileio import read_jsonl

EVAL_SPLITS = ("val", "test", "ood")
FIELDS = {"id", "task", "split", "prompt", "completion", "answer"}


@pytest.mark.parametrize("task", TASKS)
def test_generate_is_deterministic_and_seeded(task):
    for split in SPLITS:
        a = generate(task, split, 20, seed=3)
        assert a == generate(task, split, 20, seed=3)
        assert [r["prompt"] for r in a] != [r["prompt"] for r in generate(task, split, 20, seed=4)]
    # A longer draw extends a shorter one (the same stream), so sizes can grow without reshuffling.
    assert generate(task, "val", 30, seed=3)[:20] == generate(task, "val", 20, seed=3)


@pytest.mark.parametrize("task", TASKS)
def test_records_have_the_contract_fields(task):
    for split in SPLITS:
        records = generate(task, split, 25, seed=0)
        assert len(records) == 25
        assert len({r["prompt"] for r in records}) == 25
        for i, r in enumerate(records):
            assert set(r) == FIELDS
            assert r["id"] == f"{task}-{split}-{i:04d}"
            assert (r["task"], r["split"]) == (task, split)
            assert all(isinstance(r[k], str) and r[k] for k in FIELDS)


@pytest.mark.parametrize("task", TASKS)
def test_splits_never_share_a_prompt_even_across_seeds(task):
    prompts = {split: {r["prompt"] for r in generate(task, split, 150, seed=0)} for split in SPLITS}
    prompts["test-seed1"] = {r["prompt"] for r in generate(task, "test", 150, seed=1)}
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    assert not prompts["train"] & prompts["test-seed1"]
    for split in ("train", "val", "test"):
        assert not prompts[split] & prompts["ood"]


def test_unknown_task_or_split_is_refused():
    with pytest.raises(ValueError, match="unknown task"):
        generate("poetry", "val", 1, 0)
    with pytest.raises(ValueError, match="unknown split"):
        generate("arith", "dev", 1, 0)


def test_arith_ood_uses_other_templates_and_bigger_numbers():
    test, ood = generate("arith", "test", 100, 0), generate("arith", "ood", 100, 0)
    mean = lambda rs: sum(int(r["answer"]) for r in rs) / len(rs)  # noqa: E731
    assert mean(ood) > 5 * mean(test)
    first_words = lambda rs: {r["prompt"].split()[0] for r in rs}  # noqa: E731
    assert not first_words(test) & first_words(ood)
    for r in test + ood:
        assert r["completion"].endswith(f"The answer is {r['answer']}.")
        assert int(r["answer"]) >= 0


def test_choice_ood_uses_other_vocabulary_and_five_options():
    def options(r):
        return re.findall(r"^[A-E]\. (.+)$", r["prompt"], flags=re.M)

    test, ood = generate("choice", "test", 100, 0), generate("choice", "ood", 100, 0)
    assert {len(options(r)) for r in test} == {4}
    assert {len(options(r)) for r in ood} == {5}
    assert not {o for r in test for o in options(r)} & {o for r in ood for o in options(r)}
    for r in test + ood:
        assert r["completion"] == f"[[{r['answer']}]]"
        assert "[[A]]" not in r["prompt"] and "[[X]]" in r["prompt"]
    # Gold letters are spread over the positions, not stuck on one.
    assert len({r["answer"] for r in test}) == 4 and len({r["answer"] for r in ood}) == 5


def test_context_ood_asks_about_other_entities():
    test, ood = generate("context", "test", 100, 0), generate("context", "ood", 100, 0)
    assert not {r["answer"] for r in test} & {r["answer"] for r in ood}
    assert all("The ship" in r["prompt"] for r in ood) and not any("The ship" in r["prompt"] for r in test)
    for r in test + ood:
        assert r["completion"] == r["answer"]
        # The answer is in the passage, the passage is before the question.
        passage = r["prompt"].split("\nQuestion:")[0]
        assert r["answer"] in passage


def test_write_splits_writes_jsonl(tmp_path):
    paths = write_splits("choice", tmp_path / "choice", {"train": 12, "ood": 5}, seed=7)
    assert set(paths) == {"train", "ood"}
    assert read_jsonl(paths["train"]) == generate("choice", "train", 12, 7)
    assert len(read_jsonl(tmp_path / "choice" / "ood.jsonl")) == 5


# ---- the YAMLs, through lm-eval's real task loading, filters and metric ---------------------------

N_EVAL = 40


@pytest.fixture(scope="module")
def lm_tasks(tmp_path_factory):
    """Every lamdagent lm-eval task, loaded from data written where the YAMLs look for it."""
    import os

    from lm_eval.tasks import TaskManager

    from lamdagent.evaluation.evaluate import TASKS_DIR

    root = tmp_path_factory.mktemp("cwd")
    for task in TASKS:
        write_splits(task, root / "results" / "data" / task, {s: N_EVAL for s in EVAL_SPLITS}, seed=0)
    old = os.getcwd()
    os.chdir(root)  # the YAMLs' data_files are relative to the working directory
    try:
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
        names = [f"lamdagent_{t}_{s}" for t in TASKS for s in EVAL_SPLITS]
        assert set(names) <= set(manager.all_tasks)
        loaded = manager.load(names)["tasks"]
    finally:
        os.chdir(old)
    return loaded


def score(task_obj, docs, responses) -> list[float]:
    """Run the task's filter pipelines and ``process_results`` on crafted responses."""
    from lm_eval.api.instance import Instance

    instances = [
        Instance("generate_until", doc, ("", {}), idx=0, metadata=(task_obj.task_name, i, 1), resps=[resp])
        for i, (doc, resp) in enumerate(zip(docs, responses))
    ]
    assert [f.name for f in task_obj._filters] == ["extract"]
    for pipeline in task_obj._filters:
        pipeline.apply(instances)
    return [task_obj.process_results(inst.doc, [inst.filtered_resps["extract"]])["exact_match"] for inst in instances]


def docs_of(task_obj) -> list[dict]:
    return list(task_obj.test_docs())


@pytest.mark.parametrize("name", [f"lamdagent_{t}_{s}" for t in TASKS for s in EVAL_SPLITS])
def test_yaml_config_and_gold_completion_scores_one(lm_tasks, name):
    task_obj = lm_tasks[name]
    cfg = task_obj.config
    assert cfg.output_type == "generate_until"
    assert cfg.generation_kwargs["do_sample"] is False
    assert "<|im_end|>" in cfg.generation_kwargs["until"]
    docs = docs_of(task_obj)
    assert len(docs) == N_EVAL
    assert docs[0]["id"].startswith(name.removeprefix("lamdagent_").replace("_", "-"))
    assert score(task_obj, docs, [d["completion"] for d in docs]) == [1.0] * N_EVAL


@pytest.mark.parametrize("split", EVAL_SPLITS)
def test_arith_metric_takes_the_last_number(lm_tasks, split):
    task_obj = lm_tasks[f"lamdagent_arith_{split}"]
    docs = docs_of(task_obj)[:10]
    right = [f"First 3 + 4 = 7.\n\nSo the total is {int(d['answer']):,}.00 apples." for d in docs]
    wrong_last = [f"The answer is {d['answer']}. Then {int(d['answer']) + 7} more." for d in docs]
    off_by_one = [d["completion"].replace(f"is {d['answer']}.", f"is {int(d['answer']) + 1}.") for d in docs]
    assert score(task_obj, docs, right) == [1.0] * 10
    assert score(task_obj, docs, wrong_last) == [0.0] * 10
    assert score(task_obj, docs, off_by_one) == [0.0] * 10
    assert score(task_obj, docs[:1], ["I do not know."]) == [0.0]


@pytest.mark.parametrize("split", EVAL_SPLITS)
def test_choice_metric_reads_the_bracketed_letter(lm_tasks, split):
    task_obj = lm_tasks[f"lamdagent_choice_{split}"]
    docs = docs_of(task_obj)[:10]
    other = {d["id"]: next(c for c in "ABCD" if c != d["answer"]) for d in docs}
    assert score(task_obj, docs, [f"My choice is [[ {d['answer'].lower()} ]] of course." for d in docs]) == [1.0] * 10
    assert score(task_obj, docs, [f"[[{other[d['id']]}]]" for d in docs]) == [0.0] * 10
    # A bare letter or the instruction's placeholder is not an answer in the required format.
    assert score(task_obj, docs, [f"{d['answer']}. something" for d in docs]) == [0.0] * 10
    assert score(task_obj, docs, ["[[X]]"] * 10) == [0.0] * 10


@pytest.mark.parametrize("split", EVAL_SPLITS)
def test_context_metric_normalises_the_first_line(lm_tasks, split):
    task_obj = lm_tasks[f"lamdagent_context_{split}"]
    docs = docs_of(task_obj)[:10]
    assert score(task_obj, docs, [f"\n  The {d['answer'].upper()}!\nBecause the text says so." for d in docs]) == [1.0] * 10
    assert score(task_obj, docs, [f"It is {d['answer']}." for d in docs]) == [0.0] * 10
    assert score(task_obj, docs, [f"I am not sure.\n{d['answer']}" for d in docs]) == [0.0] * 10
    wrong = [next(x for x in ("Lisbon", "Oslo", "1900", "1901") if x != d["answer"]) for d in docs]
    assert score(task_obj, docs, wrong) == [0.0] * 10
