"""Joint methods: several term types fitted together."""
