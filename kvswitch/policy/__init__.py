"""NetworkPolicy: API objects → rules (cluster-wide computation) → this node's flows."""
