"""Dagster materializes an asset on another machine of the LAN, through dpipes.

Start two nodes (here both on one host), then materialize (the README's Dagster section):
``dpipesd --name alpha --listen 127.0.0.1:5757``,
``dpipesd --name beta --listen 127.0.0.1:5758 --peer 127.0.0.1:5757``,
``DPIPES_NODE=127.0.0.1:5757 dagster asset materialize -f examples/dagster/definitions.py --select orders``.
"""

import os
from pathlib import Path

import dagster as dg

from dpipes.nodes.dagster import DpipesPipesClient

JOB = Path(__file__).with_name("orders_job.py")  # the program the worker runs: it must exist there too
WORKER = os.environ.get("DPIPES_WORKER", "beta")  # the node that runs it


@dg.asset(code_version="1", check_specs=[dg.AssetCheckSpec("no_missing_ids", asset="orders")])
def orders(context: dg.AssetExecutionContext, dpipes: DpipesPipesClient) -> dg.MaterializeResult:
    """Orders of at least `min_amount`, computed on the worker node."""
    invocation = dpipes.run(context=context, command=f"python3@{WORKER} {JOB}", extras={"min_amount": 10})
    return invocation.get_materialize_result()


# The entry node: DPIPES_NODE, else this host's dpipesd, else a node inside the step's process.
defs = dg.Definitions(assets=[orders], resources={"dpipes": DpipesPipesClient()})
