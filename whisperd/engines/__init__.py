"""engines: TODO docstring."""
