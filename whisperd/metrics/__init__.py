"""metrics: TODO docstring."""
