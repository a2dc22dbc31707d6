"""What a run tells: the event log, progress lines, monitoring sinks, alerts, the console."""
