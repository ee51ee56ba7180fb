"""Studies of how compression methods interact."""
