"""Controllers: the LLM that chooses actions and rewrites the memory.

- ``openai``: any OpenAI-compatible endpoint (base_url, model; the key from the env var config names).
- ``transformers``: a local chat model in-process, greedy by default (the embedded SmolLM2).
- ``random``: no LLM; uniform over the enumerated actions (the paper's ablation).
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from dataclasses import dataclass, field

from lamdagent.redact import redact


class ControllerError(RuntimeError):
    pass


class ControllerRejected(ControllerError):
    """The endpoint refused a request for a reason a retry cannot heal (a wrong key, model name or
    parameter): the job fails with the server's message instead of the run turning into random search."""


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
    """Worth retrying: time-outs, refused or dropped connections, 408, 409, 429 and 5xx (the statuses the
    openai client itself retries). Other 4xx will not heal."""
    import openai

    if isinstance(err, openai.APIConnectionError):  # APITimeoutError is a subclass
        return True
    if isinstance(err, openai.APIStatusError):
        return err.status_code in (408, 409, 429) or err.status_code >= 500
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


def server_message(err: BaseException, limit: int = 500) -> str:
    """What the server said: OpenAI's ``error.message``, FastAPI's ``detail`` (vLLM, transformers serve), or the text."""
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        said = body.get("message") or body.get("detail") or body
        text = said if isinstance(said, str) else json.dumps(said)
    elif isinstance(body, str) and body:
        text = body
    else:
        text = str(err)
    return text if len(text) <= limit else text[:limit] + "..."


def names_parameter(err: BaseException, name: str) -> bool:
    """The server's 400 rejects request parameter ``name`` (OpenAI sets ``param``; others only say it)."""
    return getattr(err, "param", None) == name or f"'{name}'" in server_message(err) or f"`{name}`" in server_message(err)


# What to change in config after a refusal, per HTTP status.
_REFUSAL_HINTS = {
    401: "the key was refused: check the variable controller.api_key_env names",
    403: "the key may not use this model or endpoint",
    404: "check controller.model and controller.base_url",
}
# Parameters reasoning models reject, and the config that stops sending them.
_PARAMETER_HINTS = {
    "temperature": "this model takes no temperature (reasoning models accept only their default): "
                   "set controller.temperature: null to send none",
    "stop": "this model takes no stop sequences: set controller.stop: [] to send none",
}


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


# config's `controller.backoff` defaults (lamdagent.config.DEFAULTS takes them from here).
BACKOFF = {"attempts": 5, "initial_s": 1.0, "max_s": 30.0, "multiplier": 2.0}


class OpenAIController:
    kind = "openai"

    def __init__(self, *, model: str, api_key_env: str, base_url: str | None = None,
                 temperature: float | None = 0.0, timeout_s: float = 120.0, backoff: dict | None = None,
                 max_tokens_param: str = "max_tokens", seed: int = 0, structured: str = "auto"):
        import openai

        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ControllerError(f"environment variable {redact(api_key_env)} (controller.api_key_env) is not set")
        # The key lives only in this client object: it is never logged, recorded or written, and it is
        # masked in every error message (servers echo keys in their 401 bodies).
        # max_retries=0: the client's own retries would multiply with ours; one policy, one count.
        self._client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout_s, max_retries=0)
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.temperature = temperature  # None: not sent (reasoning models reject any but their default)
        # Reasoning models take max_completion_tokens and reject max_tokens; a 400 saying so switches.
        self.max_tokens_param = max_tokens_param
        self.backoff = Backoff(**{**BACKOFF, **(backoff or {})})
        self._rng = random.Random(f"{seed}:backoff")  # seeded jitter: a rerun waits the same
        # Closed-set answers as JSON-schema structured output (controller.structured); `auto` turns it
        # off for the rest of this controller's life on the first 400 saying it is unsupported.
        self.structured = structured
        self.schema_ok = structured != "text"
        self.structured_note: str | None = None  # why it was turned off (the agent records it once)

    def _describe(self, err: BaseException) -> str:
        """``Type: message`` of a failed attempt, the server's own words, the key masked."""
        return redact(f"{type(err).__name__}: {server_message(err)}", (self._client.api_key,))

    def _rejected(self, err: BaseException) -> ControllerRejected:
        status = getattr(err, "status_code", None)
        hint = next((h for p, h in _PARAMETER_HINTS.items() if status in (400, 422) and names_parameter(err, p)),
                    _REFUSAL_HINTS.get(status, "not retried: a retry cannot change the answer"))
        where = f" at {self.base_url}" if self.base_url else ""
        return ControllerRejected(redact(
            f"the controller endpoint{where} refused the request for model {self.model!r}"
            f"{f' (HTTP {status})' if status else ''}: {self._describe(err)}; {hint}", (self._client.api_key,)))

    def _request(self, prompt: str, max_tokens: int, stop: list[str] | None, response_format: dict | None):
        params = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                  self.max_tokens_param: max_tokens}
        if self.temperature is not None:
            params["temperature"] = self.temperature
        if stop:
            params["stop"] = stop
        if response_format:
            params["response_format"] = response_format
        return self._client.chat.completions.create(**params)

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
        import openai

        for attempt in range(1, self.backoff.attempts + 1):
            try:
                try:
                    response = self._request(prompt, max_tokens, stop, response_format)
                except openai.BadRequestError as err:
                    if self.max_tokens_param != "max_tokens" or not names_parameter(err, "max_tokens"):
                        raise
                    self.max_tokens_param = "max_completion_tokens"  # for this and every later call
                    response = self._request(prompt, max_tokens, stop, response_format)
            except Exception as err:
                if response_format and self.structured == "auto" and schema_unsupported(err):
                    self.schema_ok, self.structured_note = False, self._describe(err)
                    return self.complete(prompt, max_tokens=max_tokens, stop=stop, prefix=prefix)
                if not is_transient(err):
                    # from None: the openai error's own text is not shown unmasked in the traceback.
                    raise self._rejected(err) from None
                errors.append(self._describe(err))
                if attempt == self.backoff.attempts:
                    raise ControllerUnavailable(attempt, errors) from None
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
            max_tokens_param=controller_config.get("max_tokens_param", "max_tokens"),
            seed=seed,
            structured=controller_config.get("structured", "auto"),
        )
    if kind == "transformers":
        return TransformersController(model_dir=model_dir or controller_config["model"],
                                      temperature=controller_config.get("temperature") or 0.0, seed=seed)
    raise ControllerError(f"unknown controller type {kind!r}")
