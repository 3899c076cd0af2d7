"""Helpers shared by the tests, imported as `from helpers.<module> import ...`:

    cli         run `sdm` in-process or as a child process (Outcome, invoke, run_sdm, sdm_process)
    logs        write tiny logs, preprocess them and read the output back in raw ids
    training    sample and tiny data, small training runs, checkpoint comparisons
    models      small model configs, models and batches for the model tests
    processes   `sdm` as a real process that is killed or interrupted, and what it must leave
    reference   plain-Python references of the preprocessing rules and the ranking metrics

Fixtures stay in conftest.py; nothing is imported from it.
"""
