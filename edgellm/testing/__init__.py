"""Test support: tiny random HF checkpoints (``tiny``) and the numpy reference forward pass (``reference``).

Part of the package so that converters' and runtimes' tests, benchmarks and users can build the same
checkpoints. Nothing here downloads anything.
"""
