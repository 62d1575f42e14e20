"""The data models are trained on: the embedded generated tasks (``tasks``) and the named training
datasets of config's ``datasets`` (``datasets``: embedded, local file, hub; resized for the scaling study).

May import ``store`` (and ``redact``, ``errors``) only.
"""
