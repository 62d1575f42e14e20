# Config checking and the input functions that turn the agent's plan into file targets.
import functools
import glob
import os
import sys

import lamdagent.config
import lamdagent.evaluation.contamination
from lamdagent.actions.registry import ACTIONS, DATASET_KINDS, slot_kinds
from lamdagent.store.fileio import read_json
from lamdagent.agent.objects import Pool
from lamdagent.agent.plan import dag_recursion_limit, step_entries
from lamdagent.lineage.prune import is_pruned
from lamdagent.store.recipes import RecipeStore
from lamdagent.actions.registry import is_built_id
from lamdagent.evaluation.score import scoring_spec, split_tasks

# A bad config stops here, at parse time, before any job: one line naming the key. So does training
# data that holds evaluation prompts (lamdagent.evaluation.contamination; counts cached for the re-parse of every cluster job).
try:
    config.update(lamdagent.config.load(config, workdir=os.getcwd()))
    lamdagent.evaluation.contamination.guard(config, workdir=os.getcwd(), cache_dir=".snakemake/lamdagent")
except lamdagent.config.ConfigError as err:
    raise WorkflowError(str(err)) from None

RESULTS = "results"
RECIPES = RecipeStore(f"{RESULTS}/recipes")
ITERATIONS = config["iterations"]
# The chain iter_0 -> iter_N is as deep as the plan is long; the DAG build recurses along it.
sys.setrecursionlimit(dag_recursion_limit(ITERATIONS, sys.getrecursionlimit()))
TOP_K = config["report"]["top_k"]
# Built models are named <action>-<16 hex>; every other model directory is a named import.
BUILT_ID = "|".join(f"{action}-" for action in ACTIONS)
# evaluation.with_build: the action rules and evaluate share one Snakemake group, so on a cluster a
# candidate's build and its validation evaluation (both asked for by the outcome checkpoint) are one
# job: one queue wait and one status poll instead of two. Local runs ignore groups.
BUILD_GROUP = "build_and_evaluate" if config["evaluation"]["with_build"] else None


wildcard_constraints:
    hash="[0-9a-f]{16}",
    iteration="[0-9]+",
    split="val|test",
    task="[A-Za-z0-9_]+",
    dataset="[A-Za-z0-9][A-Za-z0-9_.-]*",


def resources_of(family):
    """Rule resources from config; memory and time grow with each retry. Snakemake retries a job that
    failed for infrastructure reasons (killed, node lost); a failing action is recorded, not retried."""
    spec = config["resources"][family]
    return {
        "gpu": spec["gpu"],
        "cpus_per_gpu": spec["cpus_per_gpu"],
        "mem_mb": lambda wildcards, attempt: spec["mem_mb"] * attempt,
        "runtime": lambda wildcards, attempt: spec["runtime"] * attempt,
    }


def model_dir(model):
    """The directory of a model id: a local named model stays where it is, the rest live in results/."""
    spec = config["models"].get(model, {})
    if spec.get("source") == "local":
        return os.path.normpath(spec["path"])
    return f"{RESULTS}/models/{model}"


def model_input(model, consumer, output):
    """A model's directory and, when keep_top_k removed its weights and the consumer (whose output is
    ``output``) still has to run, the flag of rule restore_model that rebuilds them first.

    A consumer that already ran never gets the flag (its input list, which Snakemake compares with
    the recorded one, stays the same); one that restored keeps it, since the flag stays.
    """
    path = model_dir(model)
    flag = f"{RESULTS}/restored/{model}/{consumer}.json"
    if os.path.exists(flag) or (is_pruned(path) and not os.path.exists(output)):
        return {"dir": path, "restored": flag}
    return {"dir": path}


def controller_inputs():
    controller = config["controller"]
    if controller["type"] != "transformers":
        return {}
    model = controller["model"]
    return {"controller_model": model_dir(model) if model in config["models"] else model}


# ---- data -------------------------------------------------------------------------------------


def eval_task_names():
    """The embedded (generated) tasks evaluated."""
    return [task["task"] for task in config["eval_tasks"] if "lm_eval_task" not in task and "source" not in task]


def file_eval_tasks():
    """The evaluated tasks with their own data (a local file or the hub), by name."""
    return {task["task"]: task for task in config["eval_tasks"] if task.get("source") in ("local", "hub")}


def file_eval_task(name):
    return file_eval_tasks()[name]


def eval_task_inputs(wildcards):
    spec = file_eval_task(wildcards.task)
    if spec["source"] != "local":
        return {}
    return {"files": list(spec["splits"].values()) if "splits" in spec else [spec["path"]]}


def embedded_tasks():
    """Every generated task: those evaluated and those embedded datasets train on."""
    names = set(eval_task_names())
    for spec in config["datasets"].values():
        if spec["source"] == "embedded":
            names.update(spec["tasks"])
    return sorted(names)


def dataset_inputs(wildcards):
    spec = config["datasets"][wildcards.dataset]
    if spec["source"] == "embedded":
        return {"tasks": [f"{RESULTS}/data/{task}/train.jsonl" for task in spec["tasks"]]}
    if spec["source"] == "local":
        return {"file": spec["path"]}
    return {}


def used_datasets():
    kinds = slot_kinds(config)
    names = {v for t, values in config["objects"].items() if kinds.get(t) in DATASET_KINDS for v in values}
    for spec in config["models"].values():
        if "recipe" in spec:
            slots = ACTIONS[spec["recipe"]["action"]].slots
            names.update(v for s, v in zip(slots, spec["recipe"]["objects"]) if s.is_dataset)
    return sorted(names)


# ---- models -----------------------------------------------------------------------------------


def action_env(spec):
    """The conda env of an action's rule: a custom action's own file, else its family's."""
    if spec.conda:
        return spec.conda
    return "../envs/merge.yaml" if spec.family == "merge" else "../envs/train.yaml"


def built_model_inputs(action):
    """Inputs of a model rule: its parents and datasets, read from the recipe the agent saved."""

    def inputs(wildcards):
        model = f"{action}-{wildcards.hash}"
        recipe = RECIPES.load(model)
        spec = ACTIONS[action]
        named = {"recipe": str(RECIPES.path(model))}
        for slot in spec.slots:
            if slot.kind == "model":
                parent = model_input(recipe["inputs"][slot.name], model, f"{RESULTS}/models/{model}")
                named[slot.name] = parent["dir"]
                if "restored" in parent:
                    named[f"{slot.name}_restored"] = parent["restored"]
            elif slot.is_dataset:
                named[slot.name] = f"{RESULTS}/datasets/{recipe['inputs'][slot.name]['name']}.jsonl"
        return named

    return inputs


def restore_inputs(wildcards):
    """The recipe and its datasets; the parents' weights are rebuilt in the job itself when pruned too."""
    recipe = RECIPES.load(wildcards.model)
    named = {"recipe": str(RECIPES.path(wildcards.model))}
    for slot in ACTIONS[recipe["action"]].slots:
        if slot.is_dataset:
            named[slot.name] = f"{RESULTS}/datasets/{recipe['inputs'][slot.name]['name']}.jsonl"
    return named


# ---- evaluation -------------------------------------------------------------------------------


# What determines an evaluation and a score is in the rules' `params`, Snakemake's rerun trigger: a
# change of the tasks or these settings re-evaluates, of a metric or weight rescores. Each value is
# computed from config alone, in a fixed order, so that an unchanged config reruns nothing.
# batch_size and device say how an evaluation runs, not what it measures: they re-evaluate nothing.
EVALUATION_SETTINGS = {"backend": config["evaluation"]["backend"], "dtype": config["evaluation"]["dtype"],
                       "limit": config["evaluation"]["limit"], "seed": config["seed"]}


def evaluation_tasks(wildcards):
    """The lm-eval tasks of one split's evaluation (sorted: their order in config changes nothing)."""
    return sorted(split_tasks(config["eval_tasks"], wildcards.split).values())


def evaluate_threads(wildcards):
    """resources.evaluate.threads; the validation of an agent step's one candidate takes candidate_threads:
    nothing else can run meanwhile (the next proposal waits for its score), where the initial models' and
    the test split's evaluations run side by side."""
    spec = config["resources"]["evaluate"]
    candidate = spec.get("candidate_threads")
    if candidate and wildcards.split == "val" and config["proposals_per_iteration"] == 1 \
            and wildcards.model in proposed_models():
        return candidate
    return spec["threads"]


def proposed_models():
    """Every model an agent step has proposed so far; the files are read again only when one is added or changed."""
    paths = sorted(glob.glob(f"{RESULTS}/agent/iter_*/proposal.json"))
    return _proposed_models(tuple((path, os.stat(path).st_mtime_ns) for path in paths))


@functools.lru_cache(maxsize=2)
def _proposed_models(stamped_paths):
    return frozenset(entry["model"] for path, _ in stamped_paths for entry in step_entries(read_json(path)))


def evaluate_inputs(wildcards):
    split = wildcards.split
    model = model_input(wildcards.model, f"evaluate-{split}", f"{RESULTS}/evals/{wildcards.model}/{split}.json")
    inputs = {"model": model["dir"], **({"restored": model["restored"]} if "restored" in model else {})}
    data = []
    for task in eval_task_names():
        data += [f"{RESULTS}/data/{task}/{s}.jsonl" for s in (["val"] if wildcards.split == "val" else ["test", "ood"])]
    inputs["data"] = data
    inputs["tasks"] = [f"{RESULTS}/eval_tasks/{task}" for task in file_eval_tasks()]
    inputs["lm_eval_data"] = [f"{RESULTS}/lm_eval_data/{name}.json" for name in FETCHED[split]]
    return inputs


def judged_tasks(split):
    """{lm-eval task: its data file} of the judged tasks evaluated on ``split``."""
    from lamdagent.evaluation.score import lm_eval_tasks

    judged = {}
    for task in config["eval_tasks"]:
        if task.get("kind") == "judge":
            for name in lm_eval_tasks(task, split).values():
                judged[name] = f"{RESULTS}/eval_tasks/{task['task']}/{name.rsplit('_', 1)[1]}.jsonl"
    return judged


JUDGED = any(task.get("kind") == "judge" for task in config["eval_tasks"])


def answers_path():
    """Rule evaluate's output: the evaluation itself, or the answers rule judge grades into it."""
    return f"{RESULTS}/evals/{{model}}/{{split}}.{'answers.' if JUDGED else ''}json"


def judge_inputs(wildcards):
    return {"answers": f"{RESULTS}/evals/{wildcards.model}/{wildcards.split}.answers.json",
            "tasks": [f"{RESULTS}/eval_tasks/{task}" for task in file_eval_tasks()]}


def fetched_lm_eval_tasks(split):
    """The lm-eval task names of ``split`` whose data rule fetch_lm_eval_task loads first (not ours)."""
    from lamdagent.evaluation.evaluate import own_task_names
    from lamdagent.evaluation.score import split_tasks

    ours = own_task_names()
    named = [task for task in config["eval_tasks"] if "lm_eval_task" in task]
    return sorted({name for name in split_tasks(named, split).values() if name not in ours})


# Once per parse: evaluate_inputs runs for every model and split of the plan.
FETCHED = {split: fetched_lm_eval_tasks(split) for split in ("val", "test")}


# ---- agent ------------------------------------------------------------------------------------


def pool():
    return Pool.from_json(read_json(checkpoints.init_pool.get().output.pool))


def proposal(iteration):
    return read_json(checkpoints.propose.get(iteration=iteration).output.proposal)


def agent_dir(iteration):
    return f"{RESULTS}/agent/iter_{iteration}"


def steps_upto(iteration):
    return [f"{agent_dir(i)}/step.json" for i in range(iteration + 1)]


def explored_steps(wildcards):
    """Steps 0..N for the rules that read the whole plan, named one iteration at a time: iteration i+1
    is asked for only once proposal i exists (a checkpoint), so the not-yet-chosen iterations stay out of
    the DAG. Named all at once, they made a chain of 2N pending jobs that Snakemake walks again after
    every checkpoint: an iteration's orchestration cost grew with N (2.3 s at N = 300)."""
    for i in range(1, ITERATIONS + 1):
        checkpoints.propose.get(iteration=i)
    return steps_upto(ITERATIONS)


def frontier_step(wildcards=None):
    """The first step of the plan not on disk yet, as a plain input; once all N are there, the last.

    A job whose input waits on a checkpoint is judged up to date while its output exists, so after a
    finished run `explored_steps` alone never asks for the iterations a raised `iterations` adds. A
    missing step named by `rule all` makes Snakemake run that iteration's propose and update_memory
    (two jobs, whatever N) and the plan's readers after them; each proposal then names the next
    through `explored_steps`. Never empty, so a finished run's recorded inputs stay the same.
    """
    steps = steps_upto(ITERATIONS)
    return next((step for step in steps if not os.path.exists(step)), steps[-1])


def outcome_inputs(wildcards):
    """The built models of step i: iteration 0's initial models made by recipes, or the proposals' models
    (all k at once, so Snakemake builds them in parallel). With evaluation.with_build also their
    validation evaluations (a failed action's says so), so that each build and its evaluation are in
    the DAG together and form one group job."""
    i = int(wildcards.iteration)
    models = pool().initial_models if i == 0 else [entry["model"] for entry in step_entries(proposal(i))]
    built = [m for m in models if is_built_id(m)]
    inputs = {"models": [model_dir(m) for m in built]}
    if BUILD_GROUP:
        inputs["evaluations"] = [answers_path().format(model=m, split="val") for m in built]
    if i > 0:
        inputs["proposal"] = f"{agent_dir(i)}/proposal.json"
    return inputs


def failed_models(iteration):
    """The models of step i whose action failed, as the outcome checkpoint recorded. A failed action
    leaves no model, so no evaluation or score of it is asked for."""
    outcome = read_json(checkpoints.outcome.get(iteration=iteration).output.outcome)
    return {model for model, entry in outcome["models"].items() if entry["status"] == "failed"}


def initial_step_inputs(wildcards):
    failed = failed_models(0)
    return {
        "pool": checkpoints.init_pool.get().output.pool,
        "outcome": f"{agent_dir(0)}/outcome.json",
        "scores": [f"{RESULTS}/scores/{m}.json" for m in pool().initial_models if m not in failed],
    }


# The agent reads the whole history from results/agent/, but only the previous step is an input: step i-1
# exists only once steps 0..i-2 do (each update_memory needs the one before), and naming all i earlier
# steps gave the DAG ~N^2/2 edges, which Snakemake walks again after every checkpoint (~9 s an
# iteration at N = 300).
def propose_inputs(wildcards):
    i = int(wildcards.iteration)
    return {
        "pool": f"{RESULTS}/agent/pool.json",
        "memory": f"{agent_dir(i - 1)}/memory.md",
        "previous_step": f"{agent_dir(i - 1)}/step.json",
        **controller_inputs(),
    }


def update_memory_inputs(wildcards):
    """All k models of the iteration are targets at once, so Snakemake builds them in parallel."""
    i = int(wildcards.iteration)
    chosen = step_entries(proposal(i))
    failed = failed_models(i)
    return {
        "proposal": f"{agent_dir(i)}/proposal.json",
        "outcome": f"{agent_dir(i)}/outcome.json",
        # A failed action has no model, so no score.
        "scores": [f"{RESULTS}/scores/{entry['model']}.json" for entry in chosen if entry["model"] not in failed],
        "memory": f"{agent_dir(i - 1)}/memory.md",
        "previous_step": f"{agent_dir(i - 1)}/step.json",
        **controller_inputs(),
    }


def topk_inputs(wildcards):
    import pandas as pd

    board = pd.read_csv(checkpoints.leaderboard.get().output.leaderboard, sep="\t")
    models = list(board["model"].head(TOP_K))
    # The base models are reported beside the top-k, as the reference row of the paper's Table 1.
    models += [m for m in pool().initial_models if not is_built_id(m) and m not in models]
    return {
        "leaderboard": checkpoints.leaderboard.get().output.leaderboard,
        "evals": [f"{RESULTS}/evals/{m}/test.json" for m in models],
        "scores": [f"{RESULTS}/scores/{m}.json" for m in models],
    }


def card_dir(model):
    """Where a model's card may be rewritten with its scores: never a user's local model directory."""
    return "" if config["models"].get(model, {}).get("source") == "local" else f"{RESULTS}/models/{model}"


# ---- scaling studies and baselines (targets `scaling` and `baselines`) -------------------------

SCALING = config["scaling"]
BASELINES = config["baselines"]


def leaderboard_frame():
    import pandas as pd

    return pd.read_csv(checkpoints.leaderboard.get().output.leaderboard, sep="\t")


def resized_dataset_inputs(wildcards):
    from lamdagent.data.datasets import per_task_examples

    spec = config["datasets"][wildcards.dataset]
    if spec["source"] == "embedded":
        n = per_task_examples(spec, int(wildcards.rows))
        return {"tasks": [f"{RESULTS}/data/{task}/train.n{n}.jsonl" for task in spec["tasks"]]}
    return dataset_inputs(wildcards)


def replay_data_inputs(wildcards):
    """The resized datasets the top-k's recipe trees need at every size (read from their recipes)."""
    from lamdagent.studies import scaling

    board = leaderboard_frame()
    files = set()
    for _, model in scaling.ranked_models(board, SCALING["top_k"]):
        for name, rows in scaling.tree_datasets(model, RECIPES).items():
            for size in scaling.sizes(SCALING):
                n = scaling.resized_rows(rows, size)
                if n != rows:
                    files.add(f"{RESULTS}/datasets/{scaling.resized_name(name, n)}.jsonl")
    return {"leaderboard": checkpoints.leaderboard.get().output.leaderboard, "datasets": sorted(files)}


def replayed_evals(study, with_sources=False):
    """Validation and test evaluations of every model a replay checkpoint named."""

    def inputs(wildcards):
        replays = getattr(checkpoints, f"replay_{study}").get().output.replays
        models = []
        for entry in read_json(replays):
            models += [entry["source"], entry["model"]] if with_sources else [entry["model"]]
        models = list(dict.fromkeys(models))
        return {
            "replays": replays,
            "evals": [f"{RESULTS}/evals/{m}/{split}.json" for m in models for split in ("val", "test")],
        }

    return inputs


def scaling_targets():
    targets = ["results/scaling/data.tsv", "results/scaling/kendall.tsv", "results/scaling/data.png"]
    return targets + (["results/scaling/model.tsv"] if "model" in SCALING else [])


def baseline_dataset_inputs(wildcards):
    full = BASELINES.get("full_sft")
    return {"pool": f"{RESULTS}/agent/pool.json",
            "datasets": [f"{RESULTS}/datasets/{full['dataset']}.jsonl"] if full else []}


def baseline_models():
    from lamdagent.store.fileio import read_json as read

    return [e["model"] for e in read(checkpoints.baseline_recipes.get().output.recipes)]


def random_baseline_inputs(wildcards):
    # After the exploration and the other baselines, so the two Snakemake runs never build one target at once.
    return {
        "leaderboard": f"{RESULTS}/leaderboard.tsv",
        "topk": f"{RESULTS}/report/topk.tsv",
        "evals": [f"{RESULTS}/evals/{m}/{split}.json" for m in baseline_models() for split in ("val", "test")],
    }


def table1_inputs(wildcards):
    import pandas as pd

    inputs = {"topk": f"{RESULTS}/report/topk.tsv", "recipes": checkpoints.baseline_recipes.get().output.recipes}
    models = baseline_models() + list(leaderboard_frame()["model"].head(TOP_K))
    if BASELINES["random"] is not False:
        inputs["random_topk"] = checkpoints.random_baseline.get().output.topk
        random_topk = pd.read_csv(inputs["random_topk"], sep="\t")
        models += list(random_topk.loc[random_topk["role"] == "top-1", "model"])
    models = list(dict.fromkeys(models))
    inputs["evals"] = [f"{RESULTS}/evals/{m}/{split}.json" for m in models for split in ("val", "test")]
    return inputs
