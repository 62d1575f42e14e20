"""The actions: the registry of action types and their slots (``registry``), the recipe a chosen action
makes (``recipe``), and the libraries that run them: ``train`` (trl: SFT, LoRA, DPO), ``merge``
(mergekit), ``custom`` (config's ``custom_actions``), ``launch`` (torchrun), ``failures`` (the action's
child process and its failure record), ``models`` (base models: embedded, local, hub; the tiny test model).

May import ``store`` and ``data`` (and ``redact``, ``errors``); never the agent, evaluation or above.
"""
