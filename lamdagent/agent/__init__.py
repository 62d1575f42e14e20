"""The agent: the object pool (``objects``), the controllers (``controller``: openai, transformers, random),
the prompts and the parsing of replies (``prompts``, ``parsing``), choosing k actions (``propose``), the
memory (``memory``), the fallback-rate stop (``fallbacks``) and the plan of steps on disk (``plan``).

May import ``actions``, ``data`` and ``store`` (and ``redact``, ``errors``); never evaluation or above.
"""
