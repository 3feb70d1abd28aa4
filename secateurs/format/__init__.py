"""On-disk formats of secateurs: packed bitmasks, the compact sparse checkpoint, pruning masks, atomic folders.

This layer depends only on torch, safetensors and :mod:`secateurs.errors`, so that model loading, the sparse
runtime and the pruning code can all build on it without importing each other.
"""
