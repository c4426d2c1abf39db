"""Stage replicas: which replica serves each session, and failing over to another when one dies."""
