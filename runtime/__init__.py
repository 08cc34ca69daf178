"""The runtime behind a compiled model: cache state, policy, executor."""
