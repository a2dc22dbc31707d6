"""Real local stand-ins for cloud services (GCS, Compute API), used by tests and benchmarks only."""
