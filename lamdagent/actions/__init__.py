"""The actions: the registry of action types and their slots (``registry``), the recipe a chosen action
makes (``recipe``), and the libraries that run them: ``train`` (trl: SFT, LoRA, DPO), ``merge``
(mergekit), ``custom`` (config's ``custom_actions``), ``launch`` (torchrun), ``failures`` (the action's
child process and its failure record), ``job_server`` (jobs of a local run forked from one process
that imported torch & co. once), ``models`` (base models: embedded, local, hub; the tiny test model).

May import ``store`` and ``data`` (and ``redact``, ``errors``); never the agent, evaluation or above.
"""
