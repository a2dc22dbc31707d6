"""Real local stand-ins for cloud services (GCS, GCE metadata, Compute API), used by tests and benchmarks."""
