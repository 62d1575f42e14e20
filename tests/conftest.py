import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Nothing may be fetched from a hub: every model and dataset the tests use is made here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer (read once from the embedded GGUF; converting it takes seconds)."""
    from transformers import AutoTokenizer

    from lamdagent.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """A tiny randomly initialised Llama (HF directory) with SmolLM2's tokenizer."""
    from lamdagent.models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", tokenizer_source=smollm2_tokenizer_dir)
