"""Goodput and cost: the ledger of a run, the price catalog, the Spot strategy planner."""
