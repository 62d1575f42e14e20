"""The rule bodies: one module per ``rules/<name>.smk``, of the same name (``data``, ``models``,
``evaluate``, ``agent``, ``report``, ``scaling``, ``baselines``); ``scripts/<rule>.py`` only calls
``<module>.<rule>(snakemake)``. ``common`` is what every job shares (its log, threads, custom actions).

May import every layer (``config`` too); only ``cli`` is above it.
"""
