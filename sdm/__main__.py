"""`python -m sdm` is the `sdm` command. torchrun starts the ranks of a DDP run through it, as it
starts any module:

    torchrun --nproc-per-node 2 -m sdm train --data DATA --out RUN [sdm train's options]
"""

from cli.app import main

main(prog_name="python -m sdm")
