"""Controllers: the LLM that chooses actions and rewrites the memory.

- ``openai``: any OpenAI-compatible endpoint (base_url, model; the key from the env var config names).
- ``transformers``: a local chat model in-process, greedy by default (the embedded SmolLM2).
- ``random``: no LLM; uniform over the enumerated actions (the paper's ablation).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


class ControllerError(RuntimeError):
    pass


@dataclass
class Completion:
    text: str
    tokens_in: int
    tokens_out: int
    latency_s: float


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """Some servers return the stop string with the text; the answer ends before it."""
    for token in stop or ():
        if token and token in text:
            text = text.split(token, 1)[0]
    return text


class OpenAIController:
    kind = "openai"

    def __init__(self, *, model: str, api_key_env: str, base_url: str | None = None, temperature: float = 0.0,
                 timeout_s: float = 120.0, max_retries: int = 2):
        import openai

        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ControllerError(f"environment variable {api_key_env} (controller.api_key_env) is not set")
        # The key lives only in this client object: it is never logged, recorded or written.
        self._client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout_s, max_retries=max_retries)
        self.model = model
        self.temperature = temperature

    def complete(self, prompt: str, *, max_tokens: int, stop: list[str] | None = None) -> Completion:
        started = time.perf_counter()
        response = self._client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=self.temperature,
            stop=stop or None,
        )
        latency = time.perf_counter() - started
        text = response.choices[0].message.content or "" if response.choices else ""
        usage = response.usage
        return Completion(
            text=cut_at_stop(text, stop),
            tokens_in=getattr(usage, "prompt_tokens", 0) or 0,
            tokens_out=getattr(usage, "completion_tokens", 0) or 0,
            latency_s=latency,
        )


class TransformersController:
    kind = "transformers"

    def __init__(self, *, model_dir: str, temperature: float = 0.0, seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.temperature = temperature
        self.seed = seed
        self.model_dir = model_dir

    def complete(self, prompt: str, *, max_tokens: int, stop: list[str] | None = None) -> Completion:
        import torch

        started = time.perf_counter()
        inputs = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        sampling = self.temperature > 0
        torch.manual_seed(self.seed)
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                max_new_tokens=max_tokens,
                do_sample=sampling,
                temperature=self.temperature if sampling else None,
                top_p=None,
                top_k=None,
                stop_strings=[s for s in stop or () if s] or None,
                tokenizer=self.tokenizer,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        return Completion(
            text=cut_at_stop(text, stop),
            tokens_in=int(inputs["input_ids"].shape[1]),
            tokens_out=int(new_tokens.shape[0]),
            latency_s=time.perf_counter() - started,
        )


def make_controller(controller_config: dict, *, model_dir: str | None = None, seed: int = 0):
    """The LLM client for a config; None for the ``random`` controller."""
    kind = controller_config["type"]
    if kind == "random":
        return None
    if kind == "openai":
        return OpenAIController(
            model=controller_config["model"],
            api_key_env=controller_config["api_key_env"],
            base_url=controller_config.get("base_url"),
            temperature=controller_config.get("temperature", 0.0),
            timeout_s=controller_config.get("timeout_s", 120.0),
        )
    if kind == "transformers":
        return TransformersController(model_dir=model_dir or controller_config["model"],
                                      temperature=controller_config.get("temperature", 0.0), seed=seed)
    raise ControllerError(f"unknown controller type {kind!r}")
