"""sam3-serve, free of Ray: core (shared) <- image pipeline <- video, jobs <- protocols (one module per front door)."""
