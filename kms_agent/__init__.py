"""kms-service storage agent (``kms-agent``): LUKS2 volumes keyed by kms-service DEKs
(format, unlock, crash-safe re-key after rotation, status), envelope-sealed files, and the
Kubernetes KMS v2 plugin."""

__version__ = "0.1.0"
