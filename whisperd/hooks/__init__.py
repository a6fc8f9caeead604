"""hooks: TODO docstring."""
