"""The external program of the example: it runs on a dpipes node and reports to Dagster through Pipes."""

import os

from dagster_pipes import open_dagster_pipes

ORDERS = [{"id": 1, "amount": 25}, {"id": 2, "amount": 5}, {"id": 3, "amount": 40}]

with open_dagster_pipes() as pipes:
    minimum = pipes.get_extra("min_amount")
    kept = [order for order in ORDERS if order["amount"] >= minimum]
    node = os.environ["DPIPES_NODE"]  # what dpipes tells a stage is in its environment, not in the extras
    pipes.log.info(f"{len(kept)} of {len(ORDERS)} orders kept on node {node}")
    pipes.report_asset_materialization(metadata={"rows": len(kept), "node": node})
    pipes.report_asset_check(check_name="no_missing_ids", passed=all("id" in order for order in kept))
