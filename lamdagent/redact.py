"""Secrets out of messages: what looks like an API key is never echoed in an error, log or record.

Keys come from the environment (``controller.api_key_env`` names the variable). Users still paste
keys where a name belongs, and servers echo keys in their error bodies; :func:`redact` masks
anything shaped like a key before a message is shown.
"""

from __future__ import annotations

import re

MASK = "<redacted>"

# Providers' key shapes (OpenAI and Anthropic sk-..., Hugging Face hf_..., GitHub, Groq, xAI, Google,
# AWS, GitLab), then any 24+ character run of letters and digits mixing upper case, lower case and
# digits (a random key; not a word, a model name with dashes, a path or a hex hash).
_KEY = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    r"(?:sk|pk|rk)-[A-Za-z0-9_-]{6,}"
    r"|(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{6,}"
    r"|hf_[A-Za-z0-9]{16,}"
    r"|gh[pousr]_[A-Za-z0-9]{16,}|github_pat_[A-Za-z0-9_]{16,}"
    r"|gsk_[A-Za-z0-9]{16,}|xai-[A-Za-z0-9]{16,}|glpat-[A-Za-z0-9_-]{16,}"
    r"|AIza[0-9A-Za-z_-]{30,}|AKIA[0-9A-Z]{16}"
    r"|(?=[A-Za-z0-9]*[a-z])(?=[A-Za-z0-9]*[A-Z])(?=[A-Za-z0-9]*[0-9])[A-Za-z0-9]{24,}"
    r")(?![A-Za-z0-9])"
)
# Credentials in URLs: user:password@host, ?key=..., &token=...
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@")
_URL_SECRET_PARAM = re.compile(r"(?i)([?&](?:api[_-]?key|key|token|access_token|secret|password)=)[^&\s'\"]+")


def looks_like_key(value: str) -> bool:
    """A value shaped like an API key (a provider's prefix, or a long random token)."""
    return isinstance(value, str) and bool(_KEY.search(value))


def is_variable_name(value: str) -> bool:
    """A plausible environment variable NAME: letters, digits and _, and not a key pasted in its place."""
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value) or looks_like_key(value):
        return False
    # Names are words (OPENAI_API_KEY); a 20+ character run with digits and no separator is a key (hex, base62).
    return "_" in value or len(value) < 20 or not any(c.isdigit() for c in value)


def redact(text: str, secrets: tuple[str, ...] | list[str] = ()) -> str:
    """``text`` with ``secrets`` (exact values, e.g. the key in use) and key-shaped tokens masked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    text = _URL_USERINFO.sub(MASK + "@", text)
    text = _URL_SECRET_PARAM.sub(lambda m: m.group(1) + MASK, text)
    return _KEY.sub(MASK, text)
