"""Health, identity and metrics."""
