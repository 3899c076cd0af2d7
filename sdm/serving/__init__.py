"""Serving: `sdm recommend`, `sdm export` (user tower + item index), faiss indexes and `sdm serve`."""
