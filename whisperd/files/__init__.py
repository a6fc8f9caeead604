"""files: TODO docstring."""
