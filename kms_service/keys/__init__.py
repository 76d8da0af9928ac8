"""Tenant keys: versions, lifecycle, the key metadata cache and KEK secrets."""
