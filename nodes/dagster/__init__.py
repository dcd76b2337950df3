"""Dagster orchestrates dpipes: a Pipes client and resource (``pip install 'dpipes-bus[dagster]'``).

The only place in dpipes that imports ``dagster``; nothing outside this package imports it.
"""

from dpipes.nodes.dagster.client import DpipesCompletedInvocation, DpipesPipesClient

__all__ = ["DpipesCompletedInvocation", "DpipesPipesClient"]
