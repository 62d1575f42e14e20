"""Controllers: the LLM that chooses actions and rewrites the memory.

- ``openai``: any OpenAI-compatible endpoint (base_url, model; the key from the env var config names).
- ``transformers``: a local chat model in-process, greedy by default (the embedded SmolLM2).
- ``random``: no LLM; uniform over the enumerated actions (the paper's ablation).
"""

from __future__ import annotations

import copy
import os
import random
import time
from dataclasses import dataclass, field


class ControllerError(RuntimeError):
    pass


class ControllerUnavailable(ControllerError):
    """Every attempt of one call failed with a transient error (the agent then falls back)."""

    def __init__(self, attempts: int, errors: list[str]):
        super().__init__(f"no reply after {attempts} attempt(s); last error: {errors[-1]}")
        self.attempts = attempts
        self.errors = errors


@dataclass
class Completion:
    text: str
    tokens_in: int
    tokens_out: int
    latency_s: float
    attempts: int = 1
    errors: list[str] = field(default_factory=list)  # the transient errors retried before this reply


@dataclass
class OptionScores:
    """A closed-set answer: each option's log-likelihood as the continuation of the prompt."""

    logprobs: list[float]
    option_tokens: list[int]  # the tokens of each option (the log-likelihood is their sum)
    tokens_in: int
    latency_s: float


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff between attempts: initial_s, x multiplier each retry, capped at max_s."""

    attempts: int
    initial_s: float
    max_s: float
    multiplier: float

    def delay(self, retry: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based).

        Jitter draws from [d/2, d] so that agents sharing a rate limit spread out, yet the wait never
        exceeds the configured schedule. A server's Retry-After is honoured up to max_s.
        """
        planned = min(self.max_s, self.initial_s * self.multiplier ** (retry - 1))
        wait = planned * rng.uniform(0.5, 1.0)
        if retry_after is not None:
            wait = max(wait, min(self.max_s, retry_after))
        return wait


def is_transient(err: BaseException) -> bool:
    """Worth retrying: time-outs, refused or dropped connections, 429 and 5xx. Other 4xx will not heal."""
    import openai

    if isinstance(err, openai.APIConnectionError):  # APITimeoutError is a subclass
        return True
    if isinstance(err, openai.APIStatusError):
        return err.status_code == 429 or err.status_code >= 500
    return False


def schema_unsupported(err: BaseException) -> bool:
    """A 400 (or a validating server's 422: llama-cpp-python takes only its own ``json_object`` type)
    whose message says the server does not take a JSON-schema ``response_format``."""
    import openai

    if not isinstance(err, (openai.BadRequestError, openai.UnprocessableEntityError)):
        return False
    message = str(err).lower()
    return any(word in message for word in ("response_format", "json_schema", "structured", "schema"))


def json_schema_format(name: str, properties: dict[str, list[int]]) -> dict:
    """``response_format`` for a closed-set answer: one integer property per question, each an enum of
    the numbers allowed. One property per slot rather than a fixed-length array: the same constraint,
    and within the subset every server takes (OpenAI's strict mode has no tuple arrays)."""
    return {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": {
        "type": "object", "additionalProperties": False, "required": list(properties),
        "properties": {key: {"type": "integer", "enum": values} for key, values in properties.items()}}}}


def _retry_after(err: BaseException) -> float | None:
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: fall back to the schedule
        return None


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """Some servers return the stop string with the text; the answer ends before it."""
    for token in stop or ():
        if token and token in text:
            text = text.split(token, 1)[0]
    return text


class OpenAIController:
    kind = "openai"

    def __init__(self, *, model: str, api_key_env: str, base_url: str | None = None, temperature: float = 0.0,
                 timeout_s: float = 120.0, backoff: dict | None = None, seed: int = 0, structured: str = "auto"):
        import openai

        from .config import DEFAULTS

        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ControllerError(f"environment variable {api_key_env} (controller.api_key_env) is not set")
        # The key lives only in this client object: it is never logged, recorded or written.
        # max_retries=0: the client's own retries would multiply with ours; one policy, one count.
        self._client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout_s, max_retries=0)
        self.model = model
        self.temperature = temperature
        self.backoff = Backoff(**{**DEFAULTS["controller"]["backoff"], **(backoff or {})})
        self._rng = random.Random(f"{seed}:backoff")  # seeded jitter: a rerun waits the same
        # Closed-set answers as JSON-schema structured output (controller.structured); `auto` turns it
        # off for the rest of this controller's life on the first 400 saying it is unsupported.
        self.structured = structured
        self.schema_ok = structured != "text"
        self.structured_note: str | None = None  # why it was turned off (the agent records it once)

    def complete(self, prompt: str, *, max_tokens: int, stop: list[str] | None = None,
                 prefix: str | None = None, response_format: dict | None = None) -> Completion:
        """One reply, retrying transient failures with backoff; ControllerUnavailable after the last attempt.

        ``response_format``: a JSON schema the server is to hold the reply to (see :func:`json_schema_format`)."""
        # `prefix` (the start of the reply) cannot be imposed through the chat API; the retry's
        # reminder in the prompt does that job here.
        if not self.schema_ok:
            response_format = None
        errors: list[str] = []
        started = time.perf_counter()  # latency counts the retries and waits: the time the agent waited
        for attempt in range(1, self.backoff.attempts + 1):
            try:
                response = self._client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=max_tokens,
                    temperature=self.temperature,
                    stop=stop or None,
                    **({"response_format": response_format} if response_format else {}),
                )
            except Exception as err:
                if response_format and self.structured == "auto" and schema_unsupported(err):
                    self.schema_ok, self.structured_note = False, f"{type(err).__name__}: {err}"
                    return self.complete(prompt, max_tokens=max_tokens, stop=stop, prefix=prefix)
                if not is_transient(err):
                    raise
                errors.append(f"{type(err).__name__}: {err}")
                if attempt == self.backoff.attempts:
                    raise ControllerUnavailable(attempt, errors) from err
                time.sleep(self.backoff.delay(attempt, self._rng, _retry_after(err)))
                continue
            return self._completion(response, stop, time.perf_counter() - started, attempt, errors)
        raise AssertionError("unreachable: Backoff.attempts >= 1")

    def take_structured_note(self) -> str | None:
        """Why structured output was turned off, once (then None)."""
        note, self.structured_note = self.structured_note, None
        return note

    @staticmethod
    def _completion(response, stop, latency: float, attempts: int, errors: list[str]) -> Completion:
        text = response.choices[0].message.content or "" if response.choices else ""
        usage = response.usage
        return Completion(
            text=cut_at_stop(text, stop),
            tokens_in=getattr(usage, "prompt_tokens", 0) or 0,
            tokens_out=getattr(usage, "completion_tokens", 0) or 0,
            latency_s=latency,
            attempts=attempts,
            errors=errors,
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

    def complete(self, prompt: str, *, max_tokens: int, stop: list[str] | None = None,
                 prefix: str | None = None) -> Completion:
        """Greedy reply; ``prefix`` is written as the start of the reply (assistant prefill), which
        keeps a small model on the answer format."""
        import torch

        started = time.perf_counter()
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=False) + (prefix or "")
        inputs = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
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
        reply = (prefix or "") + self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        return Completion(
            text=cut_at_stop(reply, stop),
            tokens_in=int(inputs["input_ids"].shape[1]),
            tokens_out=int(new_tokens.shape[0]),
            latency_s=time.perf_counter() - started,
        )


    # Options scored per forward pass: each row holds a copy of the prompt's cache.
    OPTIONS_PER_BATCH = 16

    def score_options(self, prompt: str, options: list[str], *, prefix: str = "") -> OptionScores:
        """Log-likelihood of each option after the prompt and the start of the reply, as lm-eval scores
        multiple choice (the sum over the option's tokens; context and option encoded apart).

        The prompt is run once; its key/value cache is then shared by every option (copied per batch),
        so that 20 options cost about one prompt, not 20.
        """
        import torch

        started = time.perf_counter()
        context = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                     add_generation_prompt=True, tokenize=False) + prefix
        context_ids = self.tokenizer(context, return_tensors="pt", add_special_tokens=False)["input_ids"]
        encoded = [self.tokenizer(option, add_special_tokens=False)["input_ids"] for option in options]
        if not all(encoded):
            raise ControllerError("an empty option cannot be scored")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        logprobs: list[float] = []
        with torch.inference_mode():
            # Only the last position's logits: the prompt's own would cost a vocabulary-wide row per token.
            out = self.model(input_ids=context_ids, use_cache=True, logits_to_keep=1)
            first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # the options' first token
            for start in range(0, len(encoded), self.OPTIONS_PER_BATCH):
                batch = encoded[start:start + self.OPTIONS_PER_BATCH]
                ids = torch.full((len(batch), max(map(len, batch))), pad, dtype=torch.long)
                for row, tokens in enumerate(batch):
                    ids[row, :len(tokens)] = torch.tensor(tokens)
                # Right padding needs no mask: a causal model's real tokens never see the pads after them.
                cache = copy.deepcopy(out.past_key_values)
                cache.batch_repeat_interleave(len(batch))
                step = torch.log_softmax(self.model(input_ids=ids, past_key_values=cache).logits.float(), dim=-1)
                for row, tokens in enumerate(batch):
                    total = first[tokens[0]] + sum(step[row, t - 1, tokens[t]] for t in range(1, len(tokens)))
                    logprobs.append(float(total))
        return OptionScores(logprobs=logprobs, option_tokens=[len(t) for t in encoded],
                            tokens_in=int(context_ids.shape[1]), latency_s=time.perf_counter() - started)


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
            backoff=controller_config.get("backoff"),
            seed=seed,
            structured=controller_config.get("structured", "auto"),
        )
    if kind == "transformers":
        return TransformersController(model_dir=model_dir or controller_config["model"],
                                      temperature=controller_config.get("temperature", 0.0), seed=seed)
    raise ControllerError(f"unknown controller type {kind!r}")
