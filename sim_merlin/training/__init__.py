"""Training support: metrics (and, with issue 5, the fit loop, logging and checkpoints)."""
