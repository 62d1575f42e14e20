"""The conda environments the rules name (`--sdm conda`) pin what pyproject.toml pins."""

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[ ]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_every_env_pin_agrees_with_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    # The envs hold the optional trackers too: a rule's conda env cannot install an extra on demand.
    specs = [*project["project"]["dependencies"], *extras["mlflow"], *extras["wandb"]]
    pins = {requirement_name(spec): spec.replace(" ", "") for spec in specs}
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert {p.stem for p in envs} >= {"train", "merge", "eval", "agent"}
    for env in envs:
        pip = next(d["pip"] for d in yaml.safe_load(env.read_text())["dependencies"] if isinstance(d, dict))
        for spec in pip:
            name = requirement_name(spec)
            assert name in pins, f"{env.name}: {name} is not a dependency in pyproject.toml"
            assert spec.replace(" ", "") == pins[name], f"{env.name}: {spec} but pyproject.toml has {pins[name]}"


def test_every_rule_names_an_existing_env():
    for rules in (REPO / "rules").glob("*.smk"):
        text = rules.read_text()
        for env in re.findall(r'conda:\s*\n\s*"([^"]+)"', text):
            assert (rules.parent / env).resolve().is_file(), f"{rules.name}: {env} does not exist"
