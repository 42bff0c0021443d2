"""One package per training algorithm: its loss, its run function (and its config section).

The registry of runners is `jaxreason.algorithms.registry.ALGORITHMS` (kept out of this file so
that importing one algorithm's loss does not import every runner).
"""
