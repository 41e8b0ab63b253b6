"""What runs when a user calls `kernelsearch.load`, apart from the backends: the config store."""
