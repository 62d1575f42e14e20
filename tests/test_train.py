import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lamdagent.actions.train import TrainingDiverged, load_prompt_completion, resolve_precision, sft
from lamdagent.store.fileio import read_json, sha256_file, write_jsonl

REPO = Path(__file__).resolve().parent.parent
ROWS = [{"prompt": f"What is {a} plus {a + 1}?", "completion": str(2 * a + 1), "id": a} for a in range(8)]


@pytest.fixture()
def dataset(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    write_jsonl(path, ROWS)
    return path


def _no_partial_dirs(parent: Path) -> bool:
    return not any(p.name.endswith(".partial") for p in parent.iterdir())


def test_sft_writes_a_loadable_model_and_is_deterministic(tiny_model_dir, dataset, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(learning_rate=1e-3, epochs=1, batch_size=4, max_length=64, seed=7)
    first = sft(tiny_model_dir, dataset, tmp_path / "a", **kwargs)
    second = sft(tiny_model_dir, dataset, tmp_path / "b", **kwargs)

    assert first["steps"] == 2 and first["precision"] == "fp32"
    assert first["tokens_seen"] > 0 and first["tokens_per_s"] > 0
    assert sha256_file(tmp_path / "a" / "model.safetensors") == sha256_file(tmp_path / "b" / "model.safetensors")
    assert first["train_loss"] == second["train_loss"]

    log = read_json(tmp_path / "a" / "training_log.json")
    assert [rec["step"] for rec in log if "loss" in rec] == [1, 2]

    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert tok.chat_template  # the chat template travels with the model
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert trained.config.tie_word_embeddings
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = trained.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3 or out[0, -1].item() == tok.eos_token_id
    assert _no_partial_dirs(tmp_path)


def test_only_a_model_that_takes_logits_to_keep_projects_the_completion_alone(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from lamdagent.actions.train import accepts_logits_to_keep

    class NoSlicing(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    assert accepts_logits_to_keep(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert not accepts_logits_to_keep(NoSlicing())


def test_cpu_full_logits_loss_is_trls_fused_loss(tiny_model_dir, dataset, tmp_path, monkeypatch):
    """On CPU the loss comes from the model's own logits at the completion positions (trl's fused LM
    head is slow there): the same loss, the same token count and the same trained weights as trl's
    own path, to float tolerance."""
    import torch
    from safetensors.torch import load_file

    import lamdagent.actions.train as train

    assert train.full_logits_loss_on(device_is_cuda=False) and not train.full_logits_loss_on(device_is_cuda=True)
    kwargs = dict(learning_rate=1e-3, epochs=1, batch_size=4, max_length=64, seed=7)
    full = sft(tiny_model_dir, dataset, tmp_path / "full", **kwargs)
    monkeypatch.setattr(train, "full_logits_loss_on", lambda device_is_cuda: False)
    fused = sft(tiny_model_dir, dataset, tmp_path / "fused", **kwargs)

    assert (full["loss_head"], fused["loss_head"]) == ("completion_logits", "trl_fused")
    assert full["tokens_seen"] == fused["tokens_seen"] > 0
    step_losses = [[rec["loss"] for rec in read_json(tmp_path / name / "training_log.json") if "loss" in rec]
                   for name in ("full", "fused")]
    assert step_losses[0] == pytest.approx(step_losses[1], rel=1e-4)
    accuracy = [[rec["mean_token_accuracy"] for rec in read_json(tmp_path / name / "training_log.json")
                 if "loss" in rec] for name in ("full", "fused")]
    assert accuracy[0] == pytest.approx(accuracy[1])
    weights = [load_file(tmp_path / name / "model.safetensors") for name in ("full", "fused")]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-4, atol=1e-5)


def test_sft_learns_the_completions(tiny_model_dir, tmp_path):
    """A few epochs on a fixed answer drive the completion loss far down (the loss is on the answer)."""
    path = tmp_path / "one.jsonl"
    write_jsonl(path, [{"prompt": "Say the word.", "completion": "banana"}] * 8)
    metrics = sft(tiny_model_dir, path, tmp_path / "out", learning_rate=2e-2, epochs=4, batch_size=4,
                  max_length=64, lr_scheduler_type="constant", log_path=tmp_path / "logs" / "sft.jsonl")
    log = read_json(tmp_path / "out" / "training_log.json")
    losses = [rec["loss"] for rec in log if "loss" in rec]
    assert len(losses) == metrics["steps"] == 8
    assert {rec["learning_rate"] for rec in log if "learning_rate" in rec} == {2e-2}
    assert losses[-1] < 0.5 * losses[0]
    streamed = [json.loads(line) for line in (tmp_path / "logs" / "sft.jsonl").read_text().splitlines()]
    assert [rec["loss"] for rec in streamed if "loss" in rec] == losses


def test_nan_loss_raises_and_writes_nothing(tiny_model_dir, dataset, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})

    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged, match="step 1"):
        sft(broken, dataset, out, learning_rate=1e-3, batch_size=4, max_length=64)
    assert not out.exists() and _no_partial_dirs(tmp_path)
    assert issubclass(TrainingDiverged, RuntimeError)


def test_malformed_rows_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: 'completion'"):
        load_prompt_completion(path)
    path.write_text('{"prompt": "a", "completion": 5}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: 'completion'"):
        load_prompt_completion(path)
    path.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        load_prompt_completion(path)


def test_rows_become_conversational_prompt_completion(dataset):
    rows = load_prompt_completion(dataset)
    assert rows[0] == {"prompt": [{"role": "user", "content": "What is 0 plus 1?"}],
                       "completion": [{"role": "assistant", "content": "1"}]}


def test_precision():
    import torch

    assert resolve_precision("fp32") == "fp32"
    if not torch.cuda.is_available():
        assert resolve_precision("auto") == "fp32"
    with pytest.raises(ValueError):
        resolve_precision("int8")


def test_stale_gguf_quantization_config_is_tolerated(tiny_model_dir, dataset, tmp_path):
    """A model dequantised from GGUF keeps quantization_config in config.json; Trainer would refuse it."""
    src = tmp_path / "from-gguf"
    shutil.copytree(tiny_model_dir, src)
    config = read_json(src / "config.json")
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    (src / "config.json").write_text(json.dumps(config))
    sft(src, dataset, tmp_path / "out", learning_rate=1e-3, batch_size=8, max_length=64)
    assert "quantization_config" not in read_json(tmp_path / "out" / "config.json")


def test_child_process_entry_point_matches_in_process_run(tiny_model_dir, dataset, tmp_path):
    """``python -m lamdagent.actions.failures --call lamdagent.actions.train:sft`` (what a job, or torchrun, runs) trains
    for real, and a fresh process reproduces the in-process weights bit for bit."""
    from lamdagent.actions.failures import child_command

    kwargs = dict(model_dir=str(tiny_model_dir), dataset_path=str(dataset), out_dir=str(tmp_path / "sub"),
                  learning_rate=1e-3, epochs=1, batch_size=4, max_length=64, seed=3)
    args_json = tmp_path / "args.json"
    args_json.write_text(json.dumps(kwargs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    command = child_command("lamdagent.actions.train:sft", args_json, tmp_path / "metrics.json", tmp_path / "failure.json",
                            threads=1)
    done = subprocess.run([sys.executable, "-m", "lamdagent.actions.failures", *command], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_json(tmp_path / "metrics.json")
    assert metrics["steps"] == 2 and metrics["wall_s"] > 0 and not (tmp_path / "failure.json").exists()

    # CPU float reductions are split by thread: the in-process run takes the child's one thread, whatever
    # an earlier test in this worker left torch with.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sft(**{**kwargs, "out_dir": str(tmp_path / "inproc")})
    finally:
        torch.set_num_threads(threads)
    assert sha256_file(tmp_path / "sub" / "model.safetensors") == sha256_file(tmp_path / "inproc" / "model.safetensors")


# ---- LoRA and DPO -------------------------------------------------------------------------------

from lamdagent.actions.train import ADAPTER_DIR, dpo, load_preference  # noqa: E402


def test_sft_lora_writes_a_merged_model_and_keeps_the_adapter(tiny_model_dir, dataset, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs = dict(learning_rate=5e-3, epochs=1, batch_size=4, max_length=64, seed=7, lora_rank=4, lora_alpha=8)
    metrics = sft(tiny_model_dir, dataset, tmp_path / "a", **kwargs)
    sft(tiny_model_dir, dataset, tmp_path / "b", **kwargs)
    assert metrics["steps"] == 2 and 0 < metrics["trainable_params"]
    assert sha256_file(tmp_path / "a" / "model.safetensors") == sha256_file(tmp_path / "b" / "model.safetensors")

    adapter = read_json(tmp_path / "a" / ADAPTER_DIR / "adapter_config.json")
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "a")  # a plain model: no peft needed to load it
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    # LoRA changes the adapted projections only; the embeddings stay the base's.
    assert not torch.equal(merged.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    # The kept adapter on the base gives the merged model's outputs.
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                             tmp_path / "a" / ADAPTER_DIR)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(with_adapter(ids).logits, merged(ids).logits, atol=1e-4)


@pytest.fixture()
def preferences(tmp_path) -> Path:
    path = tmp_path / "pref.jsonl"
    write_jsonl(path, [{"prompt": f"What is {a} plus {a}?", "chosen": f"{2 * a}", "rejected": f"{2 * a + 1}"}
                       for a in range(8)])
    return path


def test_dpo_prefers_the_chosen_answers_and_is_deterministic(tiny_model_dir, preferences, tmp_path):
    from transformers import AutoModelForCausalLM

    kwargs = dict(learning_rate=5e-3, beta=0.1, epochs=2, batch_size=4, max_length=64, seed=3)
    metrics = dpo(tiny_model_dir, preferences, tmp_path / "a", **kwargs)
    dpo(tiny_model_dir, preferences, tmp_path / "b", **kwargs)
    assert metrics["steps"] == 4 and metrics["precision"] == "fp32"
    assert sha256_file(tmp_path / "a" / "model.safetensors") == sha256_file(tmp_path / "b" / "model.safetensors")
    log = read_json(tmp_path / "a" / "training_log.json")
    losses = [rec["loss"] for rec in log if "loss" in rec]
    # DPO's loss starts at log 2 (policy = reference) and falls as the chosen answers gain margin.
    assert abs(losses[0] - 0.6931) < 1e-3 and losses[-1] < losses[0]
    assert metrics["rewards_margins"] > 0
    AutoModelForCausalLM.from_pretrained(tmp_path / "a")


def test_preference_rows_are_checked(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: 'rejected'"):
        load_preference(path)
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "b"}\n')
    with pytest.raises(ValueError, match="same answer"):
        load_preference(path)
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    assert load_preference(path)[0]["rejected"] == [{"role": "assistant", "content": "c"}]


def _weight_dtypes(model_dir: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as handle:
        return {str(handle.get_slice(name).get_dtype()) for name in handle.keys()}


@pytest.fixture(scope="module")
def bf16_base_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model saved in bfloat16, as a bf16 hub model (Gemma-2) is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("bf16") / "tiny-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_trained_weights_are_saved_in_the_base_dtype(tiny_model_dir, bf16_base_dir, dataset, preferences, tmp_path):
    kwargs = dict(learning_rate=1e-3, epochs=1, batch_size=4, max_length=64, seed=7)
    assert read_json(bf16_base_dir / "config.json")["dtype"] == "bfloat16" and _weight_dtypes(bf16_base_dir) == {"BF16"}
    runs = {
        "sft-bf16": lambda out: sft(bf16_base_dir, dataset, out, **kwargs),
        "lora-bf16": lambda out: sft(bf16_base_dir, dataset, out, lora_rank=4, lora_alpha=8, **kwargs),
        "dpo-bf16": lambda out: dpo(bf16_base_dir, preferences, out, beta=0.1, **kwargs),
        "sft-fp32": lambda out: sft(tiny_model_dir, dataset, out, **kwargs),
        # An explicit save_dtype wins over the base's.
        "sft-bf16-as-fp32": lambda out: sft(bf16_base_dir, dataset, out, save_dtype="float32", **kwargs),
        "sft-fp32-as-bf16": lambda out: sft(tiny_model_dir, dataset, out, save_dtype="bfloat16", **kwargs),
    }
    expected = {"sft-bf16": "bfloat16", "lora-bf16": "bfloat16", "dpo-bf16": "bfloat16", "sft-fp32": "float32",
                "sft-bf16-as-fp32": "float32", "sft-fp32-as-bf16": "bfloat16"}
    for name, run in runs.items():
        metrics = run(tmp_path / name)
        dtype = expected[name]
        assert _weight_dtypes(tmp_path / name) == {"BF16" if dtype == "bfloat16" else "F32"}, name
        assert read_json(tmp_path / name / "config.json")["dtype"] == dtype, name
        assert metrics["save_dtype"] == dtype, name  # what the lineage records
        assert metrics["precision"] == "fp32", name  # trained in fp32 on the CPU either way: only the saving differs
    with pytest.raises(ValueError, match="save_dtype"):
        sft(tiny_model_dir, dataset, tmp_path / "bad", save_dtype="int8", **kwargs)
