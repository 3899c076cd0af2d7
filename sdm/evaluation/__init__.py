"""Evaluation: exact full-catalogue top-K retrieval, the ranking metrics, `sdm evaluate` and `sdm report`."""
