"""Engine/session factories, models and the schema-version check."""

from kms_service.db.engine import Database
from kms_service.db.models import Base

__all__ = ["Base", "Database"]
