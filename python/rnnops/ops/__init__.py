"""Public functional ops: validation at the boundary, then dispatch to a backend."""
