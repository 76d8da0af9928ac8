"""Customer keys: onboarding (ExternalId, policies) and validation of a key's provider."""
