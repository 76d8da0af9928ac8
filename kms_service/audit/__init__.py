"""The tamper-evident audit chain (DESIGN §6)."""
