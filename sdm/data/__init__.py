"""The model's inputs: the catalogue, training sessions and evaluation cases as tensors, read from a
`sdm preprocess` output (pipeline/contract.py), and the memory-mapped training store."""
