"""Reports from result files: leaderboards (and, later, the paper's tables and figures)."""
