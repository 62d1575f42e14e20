"""Evaluation: lm-eval runs (``evaluate``), the own evaluation tasks' data (``eval_data``), the LLM judge
(``judge``), the score the agent reads (``score``) and the guard against training on evaluation
prompts (``contamination``).

May import ``agent`` (the judge's OpenAI client), ``actions``, ``data`` and ``store``; never lineage or above.
"""
