"""Training: the trainer (train.py) with its losses, checkpoints, DDP ranks (distributed.py) and `sdm tune`."""
