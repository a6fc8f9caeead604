"""media: TODO docstring."""
