"""Principals, roles, and API tokens."""
