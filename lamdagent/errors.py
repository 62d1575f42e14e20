"""The error every config problem raises, below every layer that checks a piece of config."""

from __future__ import annotations

from lamdagent.redact import redact


class ConfigError(ValueError):
    """A config problem, phrased as ``config: <key>: <what is wrong>``."""

    def __init__(self, key: str, problem: str):
        # Whatever a message quotes, a key pasted into the config is masked (it may reach a cluster log).
        super().__init__(redact(f"config: {key}: {problem}"))
        self.key = redact(key)
