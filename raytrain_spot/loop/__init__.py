"""The training loop, the task interface it trains, the per-step agreement, handoffs and the step."""
