"""store: TODO docstring."""
