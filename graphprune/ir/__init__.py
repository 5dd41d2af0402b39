"""The graph IR: the ``Graph``, tracing and lifting, shapes, leaf modules, metadata, masks, checkpoints.

The bottom layer: imports nothing else from graphprune.
"""
