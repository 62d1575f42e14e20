"""The paper's studies beside the exploration: the data and model scaling of its top-k (``scaling``) and
the baselines of its Table 1 (``baselines``).

May import ``report`` (its figures) and every layer below it; never config, workflow or cli.
"""
