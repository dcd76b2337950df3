"""Dagster orchestrates dpipes: a Pipes client and resource (the ``dagster`` extra: ``pip install '.[dagster]'``).

The only library code of dpipes that imports ``dagster`` (``dpipes-bench pipes`` uses it too, as its baseline).
"""

from dpipes.nodes.dagster.client import DpipesCompletedInvocation, DpipesPipesClient

__all__ = ["DpipesCompletedInvocation", "DpipesPipesClient"]
