"""The run's fallback rate: how often the controller's reply could not be used.

A question to the controller (the action type, the objects, the memory rewrite) falls back when no
reply answers it: every reply unparsable, or every call failed with transient errors past the
backoff. A few fallbacks are noise; a run that falls back most of the time is random search with an
agent's name on it, so past ``controller.max_fallback_rate`` (after ``fallback_rate_after``
questions) the agent's job stops the run with the reason, before the step is written.
"""

from __future__ import annotations

from lamdagent.redact import redact


class FallbackRateExceeded(RuntimeError):
    pass


def run_counts(entries: list[dict]) -> tuple[int, int]:
    """(questions, fallbacks) over step entries as recorded (``proposal.json``/``step.json``).

    A step's proposal questions are in its ``calls`` totals; the memory rewrite is one question per
    iteration (its ``fallback.memory_update`` flag is copied to each of the iteration's k steps).
    """
    questions = fallbacks = 0
    memory_seen: set[int] = set()
    for entry in entries:
        if not entry.get("iteration"):  # the initial models: nothing was asked
            continue
        calls = entry.get("calls") or {}
        questions += calls.get("questions", 0)
        fallbacks += calls.get("fallbacks", 0)
        flags = entry.get("fallback") or {}
        if "memory_update" in flags and entry.get("controller") != "random" and entry["iteration"] not in memory_seen:
            memory_seen.add(entry["iteration"])
            questions += 1
            fallbacks += bool(flags["memory_update"])
    return questions, fallbacks


def last_problem(calls: list[dict]) -> str | None:
    """Why the latest unusable call could not be used, in a few words (the key never shown)."""
    for call in reversed(calls):
        if call.get("error"):
            return redact(f"{call['kind']}: {call['error']}")[:300]
        if call.get("parsed") is None and call.get("reply") is not None:
            reply = call["reply"].strip()
            if not reply:
                return (f"{call['kind']}: an empty reply (a reasoning model may spend controller.max_tokens on "
                        "its reasoning: raise them)")
            shown = reply if len(reply) <= 120 else reply[:120] + "..."
            return redact(f"{call['kind']}: unparsable reply {shown!r}")
    return None


def check_fallback_rate(config: dict, entries: list[dict], calls: list[dict]) -> tuple[int, int]:
    """Raise :class:`FallbackRateExceeded` when the run's fallbacks pass the configured rate.

    ``entries``: every step entry of the run so far, this job's included; ``calls``: this job's
    controller calls (the reason shown). Returns (questions, fallbacks).
    """
    settings = config["controller"]
    questions, fallbacks = run_counts(entries)
    limit = settings["max_fallback_rate"]
    if questions >= settings["fallback_rate_after"] and fallbacks > limit * questions:
        problem = last_problem(calls)
        raise FallbackRateExceeded(
            f"controller: {fallbacks} of the run's {questions} questions to the controller "
            f"({fallbacks / questions:.0%}) fell back to the seeded random choice, more than "
            f"controller.max_fallback_rate ({limit:.0%}): the agent is not choosing, the run would be random "
            f"search.{f' Latest: {problem}.' if problem else ''} Fix the controller (model, endpoint, "
            "max_tokens) or raise controller.max_fallback_rate (1 turns the check off); rerunning resumes here.")
    return questions, fallbacks
