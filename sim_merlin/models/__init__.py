"""SIM, DIN and DIEN models built from the blocks in :mod:`sim_merlin.blocks`."""
