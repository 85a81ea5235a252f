"""Generators of crafted hostile and broken files (pickles, checkpoints, HDF5) for the safety tests.

Each module writes small files into a folder a test gives it, so that no opaque binary is committed.
"""
