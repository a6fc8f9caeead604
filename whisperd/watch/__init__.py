"""watch: TODO docstring."""
