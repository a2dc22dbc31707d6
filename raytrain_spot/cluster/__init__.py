"""The Ray cluster a run trains on: the embedded local one, `ray up` on one machine, cluster YAML checks."""
