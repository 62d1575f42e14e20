import pytest

from lamdagent.evaluation.score import alpha, lm_eval_tasks, score


def evaluation(values: dict) -> dict:
    return {"tasks": {name: {"exact_match,extract": value} for name, value in values.items()}}


def test_auto_weight_normalises_by_the_metric_maximum():
    assert alpha({"task": "arith", "metric": "exact_match", "weight": "auto"}) == 1.0
    assert alpha({"task": "x", "metric": "bleu", "weight": "auto"}) == pytest.approx(0.01)
    assert alpha({"task": "x", "metric": "score", "weight": "auto", "max": 10}) == pytest.approx(0.1)
    assert alpha({"task": "x", "weight": 2.5}) == 2.5


def test_s_multi_is_the_weighted_sum_on_validation():
    tasks = [{"task": "arith", "metric": "exact_match", "weight": "auto"},
             {"task": "choice", "metric": "exact_match", "weight": 2.0}]
    result = score(evaluation({"lamdagent_arith_val": 0.5, "lamdagent_choice_val": 0.25}), tasks, "val")
    assert result["tasks"] == {"arith": 0.5, "choice": 0.25}
    assert result["s_multi"] == pytest.approx(0.5 + 2.0 * 0.25)


def test_test_split_reports_ood_apart_from_s_multi():
    tasks = [{"task": "arith", "metric": "exact_match"}]
    result = score(evaluation({"lamdagent_arith_test": 0.4, "lamdagent_arith_ood": 0.1}), tasks, "test")
    assert result["tasks"] == {"arith": 0.4, "arith_ood": 0.1}
    assert result["s_multi"] == pytest.approx(0.4)


def test_lm_eval_task_names_are_tasks_that_exist():
    """Embedded tasks: the YAMLs the project ships; a hub or local task (the GSM8k example): the YAML
    written for it; an explicit `lm_eval_task`: lm-eval's own tasks."""
    from pathlib import Path

    import lm_eval
    import yaml

    from lamdagent.evaluation.eval_data import task_yaml
    from lamdagent.evaluation.evaluate import own_task_names

    arith = {"task": "arith", "metric": "exact_match"}
    assert lm_eval_tasks(arith, "val") == {"arith": "lamdagent_arith_val"}
    assert lm_eval_tasks(arith, "test") == {"arith": "lamdagent_arith_test", "arith_ood": "lamdagent_arith_ood"}
    assert set(lm_eval_tasks(arith, "val").values()) | set(lm_eval_tasks(arith, "test").values()) <= own_task_names()

    example = Path(__file__).resolve().parent.parent / "config" / "examples" / "gemma2-gsm8k.yaml"
    (gsm8k,) = yaml.safe_load(example.read_text())["eval_tasks"]
    assert lm_eval_tasks(gsm8k, "val") == {"gsm8k": task_yaml(gsm8k, "val", "x.jsonl")["task"]}
    assert lm_eval_tasks(gsm8k, "test") == {"gsm8k": task_yaml(gsm8k, "test", "x.jsonl")["task"]}  # no ood split

    named = {"task": "gsm8k", "lm_eval_task": {"val": "gsm8k_cot", "test": "gsm8k"}}
    assert lm_eval_tasks(named, "val") == {"gsm8k": "gsm8k_cot"} and lm_eval_tasks(named, "test") == {"gsm8k": "gsm8k"}
    shipped = {line.split(":", 1)[1].strip() for path in (Path(lm_eval.__file__).parent / "tasks" / "gsm8k").glob("*.yaml")
               for line in path.read_text().splitlines() if line.startswith("task:")}
    assert {"gsm8k_cot", "gsm8k"} <= shipped


def test_scoring_spec_is_what_the_score_depends_on():
    from lamdagent.evaluation.score import scoring_spec

    auto = [{"task": "arith", "metric": "exact_match", "weight": "auto"}]
    assert scoring_spec(auto) == scoring_spec([{"task": "arith", "weight": 1.0}])
    assert scoring_spec(auto) != scoring_spec([{"task": "arith", "weight": 2.0}])
    # Only the split scored enters: the test split's lm-eval task does not rescore validation.
    real = [{"task": "gsm8k", "metric": "exact_match", "lm_eval_task": {"val": "gsm8k_val", "test": "gsm8k"}}]
    assert scoring_spec(real) == [{"task": "gsm8k", "metric": "exact_match", "weight": 1.0,
                                   "lm_eval_task": {"val": "gsm8k_val"}}]
    evaluation = {"tasks": {"gsm8k_val": {"exact_match,strict": 0.5}}}
    assert score(evaluation, scoring_spec(real), "val")["s_multi"] == score(evaluation, real, "val")["s_multi"] == 0.5
