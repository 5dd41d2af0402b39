"""The pass infrastructure: pass configs, the pass registry, and pipelines that run passes.

May import ``graphprune.ir`` only.
"""
