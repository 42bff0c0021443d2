"""Training: `python -m jaxreason.train --config FILE`."""
