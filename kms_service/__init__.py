"""kms-service: a key management service for envelope encryption."""

__version__ = "0.1.0"
