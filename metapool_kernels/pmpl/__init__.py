"""Progressive Meta-Pooling Learning (PMPL): search, derive, retrain, evaluate."""
