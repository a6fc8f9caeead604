"""intake: TODO docstring."""
