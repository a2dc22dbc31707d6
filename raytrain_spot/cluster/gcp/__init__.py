"""Google Cloud pieces of the cluster: the multi-zone Spot node provider and its zone policy."""
