"""devices: TODO docstring."""
