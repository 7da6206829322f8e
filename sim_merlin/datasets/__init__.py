"""Data sets: the built-in synthetic behaviour log and statistics of behaviour logs."""
