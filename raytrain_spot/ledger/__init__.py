"""Goodput and cost of a run: ``ledger.json`` and ``ledger.png`` from its ``events.jsonl``.

``python -m raytrain_spot.ledger RUN_DIR`` rebuilds both and prints the table.
"""

from raytrain_spot.ledger.ledger import (CATEGORIES, LEDGER_FILE, PLOT_FILE, Ledger, LedgerOptions, build_ledger,
                                         format_table, write_ledger)
from raytrain_spot.ledger.live import RunningTotals

__all__ = ["CATEGORIES", "LEDGER_FILE", "PLOT_FILE", "Ledger", "LedgerOptions", "RunningTotals", "build_ledger",
           "format_table", "write_ledger"]
