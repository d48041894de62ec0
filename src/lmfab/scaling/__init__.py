"""Scaling: sweeps of sub-scale runs, the laws fitted to them, and the compute-optimal plan.

``scaling.fit`` reads a sweep's ``results.jsonl`` and fits Cerebras-GPT's loss-compute power
law (arXiv 2304.03208) and Hoffmann et al.'s L(N, D) (arXiv 2203.15556); ``scaling.plots``
draws them. Nothing here imports torch at module level.
"""
