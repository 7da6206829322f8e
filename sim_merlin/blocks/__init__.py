"""SIM, DIN and DIEN building blocks as Merlin Models blocks."""
