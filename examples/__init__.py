"""Runnable examples: ``queue-runtime worker examples.orders:OrderActor --queue orders``."""
