"""What is read: the leaderboard and top-k tables (``leaderboard``), the figures (``figures``), the costs
(``costs``) and ``lamdagent status`` (``status``).

May import ``lineage`` and every layer below it; never studies, config, workflow or cli.
"""
