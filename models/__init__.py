"""The ledger: SQLAlchemy 2 ORM tables. The database, not the broker, holds every item's state."""
from models.base import Base, utcnow
from models.states import BatchStatus, ItemState, ReviewDecision, Role, Verdict
from models.tables import (
    ApiKey,
    AuditChainHead,
    AuditEvent,
    Batch,
    BrandRules,
    Canary,
    Image,
    ImagePhashBand,
    Item,
    Outbox,
    QcResult,
    Review,
    TeamSettings,
    WebhookDelivery,
)

__all__ = [
    "ApiKey", "AuditChainHead", "AuditEvent", "Base", "Batch", "BrandRules", "BatchStatus", "Canary", "Image",
    "ImagePhashBand",
    "Item", "ItemState", "Outbox", "QcResult", "Review", "ReviewDecision", "Role", "TeamSettings", "Verdict",
    "WebhookDelivery", "utcnow",
]
