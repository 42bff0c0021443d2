"""`python -m jaxreason.plan`: compile a config's jitted functions for a topology, ahead of time."""
