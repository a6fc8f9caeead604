"""workers: TODO docstring."""
