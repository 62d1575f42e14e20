"""The report: pictures and costs from synthetic records (fast), and the whole HTML report in Chromium (slow)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from lamdagent.actions.recipe import make_recipe
from lamdagent.config import load
from lamdagent.errors import ConfigError
from lamdagent.report.costs import costs_table
from lamdagent.report.figures import binned_scores, pipeline_tree, step_points, write_figures
from lamdagent.report.leaderboard import leaderboard_table
from lamdagent.store.recipes import RecipeStore

REPO = Path(__file__).resolve().parent.parent
DATASETS = {"arith": {"sha256": "a" * 64, "rows": 16}, "choice": {"sha256": "c" * 64, "rows": 16},
            "all": {"sha256": "b" * 64, "rows": 32}}


def _recipe(action, values):
    return make_recipe(action, values, datasets=DATASETS, training={"epochs": 1}, merging={"dtype": "float32"},
                       seed=0)


def _score(arith, choice):
    return {"split": "val", "tasks": {"arith": arith, "choice": choice}, "weights": {"arith": 1.0, "choice": 1.0},
            "s_multi": arith + choice}


@pytest.fixture
def world(tmp_path):
    """Iteration 0 (base + two specialists) and six agent steps, one a merge and one an SFT of that merge."""
    store = RecipeStore(tmp_path / "recipes")
    spec_a = store.save(_recipe("sft", ("tiny", "arith", 1e-3)))
    spec_c = store.save(_recipe("sft", ("tiny", "choice", 1e-3)))
    labels = {"tiny": "tiny", spec_a: "specialist-arith", spec_c: "specialist-choice"}
    merged = store.save(_recipe("ties_merging", ("tiny", spec_a, spec_c, [0.5, 0.5], 0.5)))
    top = store.save(_recipe("sft", (merged, "all", 1e-3)))
    others = [store.save(_recipe("sft", (spec_a, name, 1e-3))) for name in ("arith", "choice", "all")]
    initial = {"iteration": 0, "initial": [
        {"model": m, "name": labels[m], "pipeline": labels[m], "status": "done", "score": s}
        for m, s in ((("tiny", _score(0.0, 0.0)), (spec_a, _score(0.4, 0.0)), (spec_c, _score(0.0, 0.3))))]}
    chosen = [(merged, "ties(specialist-arith, specialist-choice)", _score(0.3, 0.2)),
              (others[0], "sft(specialist-arith, arith)", _score(0.5, 0.0)),
              (top, "sft(ties(specialist-arith, specialist-choice), all)", _score(0.5, 0.4)),
              (others[1], "sft(specialist-arith, choice)", _score(0.1, 0.4)),
              (others[2], "sft(specialist-arith, all)", _score(0.4, 0.3)),
              (others[2], "sft(specialist-arith, all)", _score(0.4, 0.3))]  # a repeated recipe is a step too
    steps = [initial] + [{"iteration": i, "model": m, "pipeline": p, "status": "done", "score": s}
                         for i, (m, p, s) in enumerate(chosen, start=1)]
    steps.append({"iteration": 7, "model": "sft-0000000000000000", "pipeline": "x", "status": "failed"})
    board = leaderboard_table(steps)
    topk = pd.DataFrame([
        {"model": top, "role": "top-1", "test_arith": 0.5, "test_choice": 0.25, "test_avg": 0.375,
         "test_arith_ood": 0.1, "test_choice_ood": 0.2, "ood_avg": 0.15},
        {"model": "tiny", "role": "reference", "test_arith": 0.0, "test_choice": 0.0, "test_avg": 0.0,
         "test_arith_ood": 0.0, "test_choice_ood": 0.0, "ood_avg": 0.0}])
    return {"store": store, "labels": labels, "steps": steps, "board": board, "topk": topk, "top": top,
            "merged": merged, "spec_a": spec_a, "spec_c": spec_c}


def test_scores_are_binned_every_k_iterations(world):
    points = step_points(world["steps"])
    assert list(points["iteration"]) == [1, 2, 3, 4, 5, 6]  # no initial model, no failed step
    bins = binned_scores(points, every_k=4)
    assert list(bins["bin_start"]) == [1, 5] and list(bins["bin_end"]) == [4, 8]
    first = [0.5, 0.5, 0.9, 0.5]
    assert bins["mean"][0] == pytest.approx(sum(first) / 4)
    assert bins["max"][0] == pytest.approx(0.9)
    assert bins["std"][0] == pytest.approx(pd.Series(first).std(ddof=0))
    assert bins["mean"][1] == pytest.approx(0.7) and bins["std"][1] == pytest.approx(0.0) and bins["n"][1] == 2


def test_pipeline_tree_has_a_box_per_action_with_its_inputs_and_scores(world):
    scores = dict(zip(world["board"]["model"], world["board"]["s_multi"]))
    tree = pipeline_tree(world["top"], world["store"], world["labels"], scores)
    assert tree["title"] == "SFT" and "data: all" in tree["lines"] and tree["score"] == pytest.approx(0.9)
    (merge,) = tree["children"]
    assert merge["title"] == "TIES" and "base: tiny" in merge["lines"] and merge["score"] == pytest.approx(0.5)
    assert [(c["title"], c["score"]) for c in merge["children"]] == [("specialist-arith", 0.4),
                                                                      ("specialist-choice", 0.3)]
    assert all(not c["children"] for c in merge["children"])


def test_pictures_are_written_as_png_and_svg(world, tmp_path):
    out = tmp_path / "report"
    written = write_figures(world["steps"], world["board"], world["topk"], world["store"], world["labels"],
                            top_k=2, every_k=3, out_dir=out)
    names = sorted(p.name for p in written)
    assert names == sorted(f"{stem}.{ext}" for stem in ("score_over_iterations", "pipelines", "task_scores")
                           for ext in ("png", "svg"))
    for path in written:
        assert path.parent == out and path.stat().st_size > 2000, path
        if path.suffix == ".png":
            with Image.open(path) as image:
                image.verify()
            with Image.open(path) as image:
                assert image.format == "PNG"
                width, height = image.size
                assert 400 <= width <= 4000 and 200 <= height <= 4000, (path.name, image.size)
                # Not a blank canvas: a drawn figure has many colours.
                assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20
        else:
            assert ET.parse(path).getroot().tag.endswith("svg")
    assert not list(out.glob(".*.tmp"))
    # No timestamps or random ids: the same records give byte-identical files (a rerun changes nothing).
    again = write_figures(world["steps"], world["board"], world["topk"], world["store"], world["labels"],
                          top_k=2, every_k=3, out_dir=tmp_path / "again")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in written]
    # Two pipelines stack two panels: taller than one.
    one = write_figures(world["steps"], world["board"], world["topk"], world["store"], world["labels"],
                        top_k=1, every_k=3, out_dir=tmp_path / "one")
    height = {p.parent.name: Image.open(p).size[1] for p in written + one if p.name == "pipelines.png"}
    assert height["report"] > height["one"]


def test_pictures_of_an_exploration_without_steps_still_exist(world, tmp_path):
    written = write_figures(world["steps"][:1], world["board"].head(0), world["topk"].head(0), world["store"],
                            world["labels"], top_k=2, every_k=3, out_dir=tmp_path)
    assert len(written) == 6 and all(p.stat().st_size > 0 for p in written)


def _bench(path: Path, rows: list[tuple[float, float, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time"]
    lines += [f"{s}\t0:00:00\t{rss}\t1\t1\t1\t0\t0\t50\t{cpu}" for s, cpu, rss in rows]
    path.write_text("\n".join(lines) + "\n")


def test_costs_per_stage_and_per_call_kind(tmp_path):
    bench, agent = tmp_path / "benchmarks", tmp_path / "agent"
    _bench(bench / "sft" / "a.tsv", [(10, 20, 100)])
    _bench(bench / "sft" / "b.tsv", [(30, 40, 300)])
    _bench(bench / "ties_merging" / "c.tsv", [(4, 3, 50), (6, 5, 70)])  # two repeats: their mean
    _bench(bench / "evaluate" / "sft-a.val.tsv", [(5, 6, 10)])
    _bench(bench / "evaluate" / "sft-a.test.tsv", [(7, 8, 10)])
    _bench(bench / "score" / "sft-a.tsv", [(1, 1, 5)])
    _bench(bench / "agent" / "propose_1.tsv", [(2, 2, 5)])
    _bench(bench / "agent" / "memory_1.tsv", [(3, 3, 5)])
    calls = {"propose": [("type_selection", 100, 10), ("type_selection", 120, 12), ("object_selection", 200, 5)],
             "memory": [("memory_update", 300, 50)]}
    (agent / "iter_1").mkdir(parents=True)
    for name, rows in calls.items():
        text = "".join(json.dumps({"kind": k, "tokens_in": i, "tokens_out": o, "latency_s": 0.5}) + "\n"
                       for k, i, o in rows)
        (agent / "iter_1" / f"{name}_calls.jsonl").write_text(text)
    resources = {"sft": {"gpu": 2}, "ties_merging": {"gpu": 0}, "evaluate": {"gpu": 1}}
    prices = {"input_per_1m_tokens": 2.5, "output_per_1m_tokens": 10.0, "gpu_hour": 3.6, "cpu_hour": 0.36}
    evals = tmp_path / "evals"
    (evals / "sft-a").mkdir(parents=True)
    (evals / "sft-a" / "val.json").write_text(json.dumps({"tasks": {"arith_val": {"n": 30}, "choice_val": {"n": 10}}}))
    (evals / "sft-a" / "test.json").write_text(json.dumps({"tasks": {"arith_test": {"n": 40}}}))
    table = costs_table(bench, agent, resources, prices, evals_dir=evals).set_index("stage")

    assert list(table.index) == ["action:sft", "action:ties_merging", "agent:propose", "agent:update_memory",
                                 "evaluate:test", "evaluate:val", "score", "evaluate_task:arith_test",
                                 "evaluate_task:arith_val", "evaluate_task:choice_val", "agent_call:memory_update",
                                 "agent_call:object_selection", "agent_call:type_selection", "total"]
    # Per-task evaluation time: the job's time split by examples (30 + 10 of the val job's 5 s).
    assert table.loc["evaluate_task:arith_val", ["wall_s", "cpu_s", "gpu_s"]].tolist() == [3.75, 4.5, 3.75]
    assert table.loc["evaluate_task:choice_val", "wall_s"] == 1.25 and table.loc["evaluate_task:arith_test",
                                                                                  "wall_s"] == 7
    assert set(table.loc[table.index.str.startswith("evaluate_task:"), "kind"]) == {"compute_share"}
    sft = table.loc["action:sft"]
    assert (sft["kind"], sft["jobs"], sft["wall_s"], sft["cpu_s"], sft["gpus"], sft["gpu_s"], sft["max_rss_mb"]) == \
        ("compute", 2, 40, 60, 2, 80, 300)
    assert sft["cost_usd"] == pytest.approx(80 * 3.6 / 3600 + 60 * 0.36 / 3600)
    ties = table.loc["action:ties_merging"]
    assert (ties["jobs"], ties["wall_s"], ties["cpu_s"], ties["gpu_s"]) == (1, 5, 4, 0)
    assert table.loc["evaluate:test", "gpu_s"] == 7 and table.loc["score", "gpus"] == 0
    types = table.loc["agent_call:type_selection"]
    assert (types["kind"], types["calls"], types["tokens_in"], types["tokens_out"]) == ("agent", 2, 220, 22)
    assert types["latency_s"] == pytest.approx(1.0)
    assert types["cost_usd"] == pytest.approx((220 * 2.5 + 22 * 10.0) / 1e6)
    total = table.loc["total"]
    assert total["wall_s"] == pytest.approx(40 + 5 + 5 + 7 + 1 + 2 + 3)  # the per-task shares are not added again
    assert total["jobs"] == 8
    assert (total["calls"], total["tokens_in"], total["tokens_out"]) == (4, 720, 77)
    assert total["cost_usd"] == pytest.approx(table.loc[table["kind"].isin(["compute", "agent"]), "cost_usd"].sum())

    # A job whose lineage says it ran on the CPU used no GPU, whatever config asked for.
    (tmp_path / "models" / "sft-b").mkdir(parents=True)
    (tmp_path / "models" / "sft-b" / "lineage.json").write_text(json.dumps({"run": {"device": "cpu"}}))
    (tmp_path / "models" / "sft-a").mkdir(parents=True)
    (tmp_path / "models" / "sft-a" / "lineage.json").write_text(json.dumps({"run": {"device": "cuda"}}))
    measured = costs_table(bench, agent, resources, prices, models_dir=tmp_path / "models").set_index("stage")
    assert measured.loc["action:sft", ["gpus", "gpu_s"]].tolist() == [2, 20]
    # Allocated GPU seconds are billed; busy GPU seconds are what the job measured (NaN until all did).
    assert pd.isna(measured.loc["action:sft", "gpu_busy_s"])
    (tmp_path / "models" / "sft-a" / "lineage.json").write_text(json.dumps({"run": {"device": "cuda",
                                                                                   "gpu_busy_s": 12.5}}))
    (evals / "sft-a" / "test.json").write_text(json.dumps({"tasks": {"arith_test": {"n": 40}},
                                                         "settings": {"device": "cuda"}, "run": {"gpu_busy_s": 3.0}}))
    measured = costs_table(bench, agent, resources, prices, evals_dir=evals,
                           models_dir=tmp_path / "models").set_index("stage")
    assert measured.loc["action:sft", ["gpu_s", "gpu_busy_s"]].tolist() == [20, 12.5]  # sft-b ran on the CPU: 0
    assert measured.loc["evaluate:test", ["gpu_s", "gpu_busy_s"]].tolist() == [7, 3.0]
    assert pd.isna(measured.loc["evaluate:val", "gpu_busy_s"])  # a GPU job that measured nothing
    assert measured.loc["action:ties_merging", "gpu_busy_s"] == 0  # config gives it no GPU


def test_report_settings_are_optional_with_defaults_and_checked():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.pop("report", None)
    loaded = load(copy.deepcopy(config), REPO)
    assert loaded["report"]["every_k"] >= 1 and loaded["report"]["prices"]["gpu_hour"] == 0.0
    config["report"] = {"prices": {"gpu_hour": 2.0}}
    loaded = load(copy.deepcopy(config), REPO)
    assert loaded["report"]["prices"] == {"input_per_1m_tokens": 0.0, "output_per_1m_tokens": 0.0,
                                          "gpu_hour": 2.0, "cpu_hour": 0.0}
    config["report"] = {"prices": {"gpu_hours": 2.0}}
    with pytest.raises(ConfigError, match="report.prices"):
        load(copy.deepcopy(config), REPO)
    config["report"] = {"every_k": 0}
    with pytest.raises(ConfigError, match="report.every_k"):
        load(copy.deepcopy(config), REPO)


# ---- the HTML report in a real browser ----------------------------------------------------------


class _AppText(HTMLParser):
    """The text and table cells React rendered into <div id="app"> (the data <script>s sit outside it)."""

    def __init__(self):
        super().__init__()
        self.depth = 0  # >0 while inside #app
        self.text: list[str] = []
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        if self.depth:
            self.depth += tag not in ("br", "img", "input", "meta", "link", "hr", "col")
            self._in_cell = self._in_cell or tag in ("td", "th")
        elif dict(attrs).get("id") == "app":
            self.depth = 1

    def handle_endtag(self, tag):
        if self.depth and tag not in ("br", "img", "input", "meta", "link", "hr", "col"):
            self.depth -= 1
            if tag in ("td", "th"):
                self._in_cell = False

    def handle_data(self, data):
        if self.depth:
            self.text.append(data)
            if self._in_cell and data.strip():
                self.cells.append(data.strip())


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("LAMDAGENT_REQUIRE_CHROMIUM"):
            pytest.fail("LAMDAGENT_REQUIRE_CHROMIUM is set but chromium is not installed (.ci/chromium-up.sh)")
        pytest.skip("chromium is not installed (.ci/chromium-up.sh installs it)")
    return found


def render_dom(browser: str, page: Path, profile: Path) -> str:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_exploration_report_renders_in_chromium(tmp_path, tiny_model_dir):
    from e2e import run_snakemake, write_tiny_config

    browser = chromium()
    workdir = tmp_path / "run"
    config = write_tiny_config(workdir, tiny_model_dir, iterations=2, report={"top_k": 2, "every_k": 1})
    run_snakemake(workdir, config)
    out = workdir / "results" / "report"
    for stem in ("score_over_iterations", "pipelines", "task_scores"):
        for ext in ("png", "svg"):
            assert (out / f"{stem}.{ext}").stat().st_size > 2000, f"{stem}.{ext}"
    costs = pd.read_csv(out / "costs.tsv", sep="\t").set_index("stage")
    assert {"action:sft", "evaluate:val", "evaluate:test", "score", "agent:propose", "agent:update_memory",
            "report:leaderboard", "report:figures", "total"} <= set(costs.index)
    assert costs.loc["agent:propose", "jobs"] == 2 and costs.loc["evaluate:val", "jobs"] >= 3
    assert any(stage.startswith("evaluate_task:") for stage in costs.index)
    counted = costs["kind"].isin(["compute", "agent"])
    assert costs.loc["total", "wall_s"] == pytest.approx(costs.loc[counted, "wall_s"].sum(), abs=1e-2)

    run_snakemake(workdir, config, "--report", "results/report.html", timeout=300)
    page = workdir / "results" / "report.html"
    assert page.stat().st_size > 100_000
    board = pd.read_csv(workdir / "results" / "leaderboard.tsv", sep="\t")

    parser = _AppText()
    parser.feed(render_dom(browser, page, tmp_path / "chromium-profile"))
    rendered = " ".join(parser.text)
    # The landing page shows the workflow description with the leaderboard as a table.
    assert "Leaderboard" in rendered, rendered[:2000]
    for model in board["model"]:
        assert model in parser.cells, (model, parser.cells[:40])
    # The categories of the marked outputs are in the menu, and the report embeds the marked files.
    for category in ("Figures", "Costs"):
        assert category in rendered, category
    html = page.read_text(encoding="utf-8")
    results = html[html.index('<script id="results">'):]
    results = results[:results.index("</script>")]
    for name in ("score_over_iterations.png", "pipelines.png", "task_scores.png", "costs.tsv", "topk.tsv"):
        assert name in results, name
