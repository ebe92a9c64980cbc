"""Reports from result files: leaderboards (leaderboard.py) and the paper's tables and figures (tables.py)."""
