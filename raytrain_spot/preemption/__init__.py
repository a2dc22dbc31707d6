"""Preemption notices: the per-VM watcher that drains a node, the driver's node events."""
