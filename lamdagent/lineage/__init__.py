"""What a model directory is made of: its record (``records``), the clock of its job (``clock``), the
tree it spells (``tree``), its text and model card (``cards``), ``verify`` (re-hash), ``rebuild`` (make
the tree again) and ``prune`` (``keep_top_k``: remove and restore weights).

May import ``evaluation``, ``agent``, ``actions``, ``data`` and ``store``; never report, studies or above.
"""
