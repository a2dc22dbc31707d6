"""What a running job tells the outside world from its event log: monitoring sinks and alerts."""
