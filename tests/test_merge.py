import json
import shutil
from pathlib import Path

import pytest
import yaml

from lamdagent.actions.merge import ties_merge
from lamdagent.store.fileio import read_json

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402


def _weights(model_dir: Path) -> dict:
    return load_file(Path(model_dir) / "model.safetensors")


def _variant(base_dir: Path, out: Path, delta: dict) -> Path:
    """A copy of base_dir whose weights are base + delta[name] (same tokenizer and config)."""
    shutil.copytree(base_dir, out)
    weights = _weights(base_dir)
    save_file({k: v + delta[k] for k, v in weights.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def task_vector(tiny_model_dir) -> dict:
    gen = torch.Generator().manual_seed(1)
    return {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in _weights(tiny_model_dir).items()}


@pytest.fixture(scope="module")
def tuned_dir(tiny_model_dir, task_vector, tmp_path_factory) -> Path:
    return _variant(tiny_model_dir, tmp_path_factory.mktemp("tuned") / "m", task_vector)


def _assert_weights(merged_dir: Path, expected: dict, atol: float = 1e-6):
    merged = _weights(merged_dir)
    for name, value in expected.items():
        assert torch.allclose(merged[name], value, atol=atol), name


def test_two_copies_of_a_model_merge_back_to_it(tiny_model_dir, tuned_dir, tmp_path):
    """Identical task vectors all agree in sign, so normalised TIES returns the model itself
    whatever the weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    twin = shutil.copytree(tuned_dir, tmp_path / "twin")  # mergekit refuses the same path twice
    info = ties_merge(tiny_model_dir, [tuned_dir, twin], [0.3, 0.7], 1.0, out)
    _assert_weights(out, _weights(tuned_dir))
    assert info["method"] == "ties" and info["merge_runtime_s"] > 0 and info["n_models"] == 2

    # a complete, loadable model directory with tied embeddings, tokenizer and chat template
    cfg = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert cfg["merge_method"] == "ties" and [m["parameters"]["weight"] for m in cfg["models"]] == [0.3, 0.7]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    reference = AutoModelForCausalLM.from_pretrained(tuned_dir)
    with torch.no_grad():
        assert torch.allclose(model(**ids).logits, reference(**ids).logits, atol=1e-4)
    assert model.generate(**ids, max_new_tokens=2, do_sample=False).shape[1] > ids["input_ids"].shape[1]
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_unnormalised_weight_scales_the_task_vector(tiny_model_dir, tuned_dir, task_vector, tmp_path):
    base = _weights(tiny_model_dir)
    ties_merge(tiny_model_dir, [tuned_dir], [0.25], 1.0, tmp_path / "m", normalize=False)
    _assert_weights(tmp_path / "m", {k: v + 0.25 * task_vector[k] for k, v in base.items()})


def test_sign_election_keeps_the_dominant_direction(tiny_model_dir, task_vector, tmp_path):
    """Deltas +d and -2d: TIES elects the sign of -2d and drops +d entirely, giving base - 2d
    (a plain weighted average would give base - 0.5d)."""
    base = _weights(tiny_model_dir)
    plus = _variant(tiny_model_dir, tmp_path / "plus", task_vector)
    minus = _variant(tiny_model_dir, tmp_path / "minus", {k: -2 * v for k, v in task_vector.items()})
    ties_merge(tiny_model_dir, [plus, minus], [1.0, 1.0], 1.0, tmp_path / "m")
    _assert_weights(tmp_path / "m", {k: v - 2 * task_vector[k] for k, v in base.items()})


def test_density_keeps_the_largest_deltas(tiny_model_dir, tuned_dir, task_vector, tmp_path):
    base = _weights(tiny_model_dir)
    ties_merge(tiny_model_dir, [tuned_dir], [1.0], 0.3, tmp_path / "m")
    merged = _weights(tmp_path / "m")
    name = "model.layers.0.mlp.up_proj.weight"
    delta = merged[name] - base[name]
    kept = delta.abs() > 1e-7
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    # kept entries carry the full task vector, and they are the largest ones by magnitude
    assert torch.allclose(delta[kept], task_vector[name][kept], atol=1e-6)
    assert task_vector[name][kept].abs().min() >= task_vector[name][~kept].abs().max() - 1e-7


@pytest.mark.parametrize("weights, density, match", [
    ([1.0], 0.5, "2 models"),
    ([1.0, 1.0], 0.0, "density"),
    ([1.0, 1.0], 1.5, "density"),
    ([1.0, float("nan")], 0.5, "finite"),
    ([1.0, -1.0], 0.5, "sum to 0"),
])
def test_invalid_arguments(tiny_model_dir, tuned_dir, tmp_path, weights, density, match):
    with pytest.raises(ValueError, match=match):
        ties_merge(tiny_model_dir, [tuned_dir, tuned_dir], weights, density, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_duplicate_model_dir_is_rejected(tiny_model_dir, tuned_dir, tmp_path):
    with pytest.raises(ValueError, match="listed twice"):
        ties_merge(tiny_model_dir, [tuned_dir, tuned_dir], [0.5, 0.5], 1.0, tmp_path / "m")


def test_missing_model_dir_is_not_looked_up_on_a_hub(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="not a model directory"):
        ties_merge(tiny_model_dir, [tmp_path / "nope"], [1.0], 0.5, tmp_path / "m")


def test_stale_gguf_quantization_config_is_dropped(tiny_model_dir, tuned_dir, tmp_path):
    base = tmp_path / "from-gguf"
    shutil.copytree(tiny_model_dir, base)
    config = read_json(base / "config.json")
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    (base / "config.json").write_text(json.dumps(config))
    info = ties_merge(base, [tuned_dir], [1.0], 1.0, tmp_path / "m")
    assert info["stripped_gguf_quantization_config"]
    assert "quantization_config" not in read_json(tmp_path / "m" / "config.json")


# ---- the other mergekit methods ----------------------------------------------------------------

from lamdagent.actions.merge import build_merge_config, merge  # noqa: E402
from lamdagent.store.fileio import sha256_file  # noqa: E402


@pytest.fixture(scope="module")
def other_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A second fine-tune: base + a task vector independent of ``task_vector``."""
    gen = torch.Generator().manual_seed(2)
    delta = {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in _weights(tiny_model_dir).items()}
    return _variant(tiny_model_dir, tmp_path_factory.mktemp("other") / "m", delta)


def test_linear_is_the_weighted_average(tuned_dir, other_dir, tmp_path):
    a, b = _weights(tuned_dir), _weights(other_dir)
    info = merge("linear", None, [tuned_dir, other_dir], tmp_path / "m", weights=[0.25, 0.75], normalize=True)
    _assert_weights(tmp_path / "m", {k: 0.25 * a[k] + 0.75 * b[k] for k in a})
    assert info["method"] == "linear" and not info["randomized"]
    cfg = yaml.safe_load((tmp_path / "m" / "mergekit_config.yml").read_text())
    assert "base_model" not in cfg and cfg["parameters"] == {"normalize": True}


def test_task_arithmetic_adds_the_weighted_task_vectors(tiny_model_dir, tuned_dir, other_dir, tmp_path):
    base, a, b = _weights(tiny_model_dir), _weights(tuned_dir), _weights(other_dir)
    merge("task_arithmetic", tiny_model_dir, [tuned_dir, other_dir], tmp_path / "m", weights=[1.0, 0.5])
    # Not divided by the weights' sum: task arithmetic scales each task vector by its weight.
    _assert_weights(tmp_path / "m", {k: base[k] + 1.0 * (a[k] - base[k]) + 0.5 * (b[k] - base[k]) for k in base})


def test_slerp_interpolates_between_the_two_models(tuned_dir, other_dir, tmp_path):
    a, b = _weights(tuned_dir), _weights(other_dir)
    name = "model.layers.0.mlp.up_proj.weight"
    merge("slerp", None, [tuned_dir, other_dir], tmp_path / "m", t=0.3)
    merged = _weights(tmp_path / "m")[name]
    # Between the two (closer to the first at t = 0.3), and not the straight line in general.
    assert (merged - a[name]).norm() < (merged - b[name]).norm()
    assert not torch.allclose(merged, 0.7 * a[name] + 0.3 * b[name], atol=1e-7)
    cfg = yaml.safe_load((tmp_path / "m" / "mergekit_config.yml").read_text())
    assert cfg["base_model"] == str(Path(tuned_dir).resolve()) and cfg["parameters"] == {"t": 0.3}


def test_dare_ties_is_random_but_seeded(tiny_model_dir, tuned_dir, task_vector, tmp_path):
    """DARE drops entries at random and rescales the kept ones: the seed fixes the mask."""
    base = _weights(tiny_model_dir)
    kwargs = dict(weights=[1.0], density=0.5, normalize=False)
    info = merge("dare_ties", tiny_model_dir, [tuned_dir], tmp_path / "s1", seed=1, **kwargs)
    merge("dare_ties", tiny_model_dir, [tuned_dir], tmp_path / "s1-again", seed=1, **kwargs)
    merge("dare_ties", tiny_model_dir, [tuned_dir], tmp_path / "s2", seed=2, **kwargs)
    assert info["randomized"] and info["seed"] == 1
    digest = {d: sha256_file(tmp_path / d / "model.safetensors") for d in ("s1", "s1-again", "s2")}
    assert digest["s1"] == digest["s1-again"] != digest["s2"]
    name = "model.layers.0.mlp.up_proj.weight"
    delta = _weights(tmp_path / "s1")[name] - base[name]
    kept = delta.abs() > 1e-7
    assert 0.4 < kept.float().mean().item() < 0.6
    # The kept entries are rescaled, all by the same factor, so that the delta keeps its L1 norm.
    ratio = delta[kept] / task_vector[name][kept]
    assert torch.allclose(ratio, ratio.mean().expand_as(ratio), rtol=1e-4) and ratio.mean().item() > 1.2
    assert torch.allclose(delta.abs().sum(), task_vector[name].abs().sum(), rtol=1e-4)


@pytest.mark.parametrize("method, kwargs, match", [
    ("slerp", dict(t=1.5), "t must be"),
    ("slerp", dict(t=0.5, extra=True), "exactly 2"),
    ("dare_ties", dict(weights=[1.0, 1.0], density=0.0), "density"),
    ("linear", dict(weights=[1.0]), "2 models"),
    ("bogus", dict(), "unknown merge method"),
])
def test_invalid_merge_arguments(tiny_model_dir, tuned_dir, other_dir, tmp_path, method, kwargs, match):
    dirs = [tuned_dir, other_dir] + ([tiny_model_dir] if kwargs.pop("extra", False) else [])
    with pytest.raises(ValueError, match=match):
        build_merge_config(method, tiny_model_dir, dirs, **kwargs)
