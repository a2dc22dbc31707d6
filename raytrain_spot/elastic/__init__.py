"""Elastic training on Spot capacity: the live capacity view, Ray Train's policies, warm standbys."""
