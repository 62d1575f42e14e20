"""What is kept on disk: atomic file writes and hashes (``fileio``), the content-addressed recipe files
and model ids (``recipes``), the experiment-tracking backends (``tracking``: TensorBoard, MLflow).

The lowest layer: it imports nothing of lamdagent but ``redact`` and ``errors``.
"""
