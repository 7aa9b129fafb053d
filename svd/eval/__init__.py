"""Evaluation: metrics as pure functions over features and statistics (`frechet`, `adherence`, `quality`),
so every number the evaluation job reports can be recomputed from what it stored."""
