"""Export to HuggingFace format (`python -m jaxreason.export`)."""
