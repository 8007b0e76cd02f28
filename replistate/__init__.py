"""replistate: the state of long-running operations, the same on every replica.

Each replica of a web app keeps an in-memory mirror of every operation. PostgreSQL
keeps the durable record and a message bus (NATS by default) carries live changes.
"""

from replistate.bus.base import BusState, Channel, MessageBus, Subscription
from replistate.bus.memory import InMemoryBroker, InMemoryBus
from replistate.bus.nats import NatsBus
from replistate.errors import (
    BusError,
    CallTimeoutError,
    CodecError,
    DecodeError,
    EncodeError,
    InvalidIdError,
    JobNotFoundError,
    NotStartedError,
    OperationConflictError,
    OperationFailed,
    PayloadTooLargeError,
    ReplistateError,
    StoreError,
)
from replistate.models import (
    NodeProgress,
    NodeState,
    OperationRecord,
    OpState,
    OpStatus,
    OpType,
)
from replistate.opcache import OpCache, OpCacheEntry
from replistate.replica import Replica, ReplicaConfig
from replistate.runner import OperationHandle
from replistate.service import CancelOutcome, OperationsService
from replistate.store.base import GalleryStore
from replistate.store.memory import InMemoryStore
from replistate.store.postgres import PostgresGalleryStore
from replistate.subjects import Subjects

__all__ = [
    "BusError",
    "BusState",
    "CallTimeoutError",
    "CancelOutcome",
    "Channel",
    "CodecError",
    "DecodeError",
    "EncodeError",
    "GalleryStore",
    "InMemoryBroker",
    "InMemoryBus",
    "InMemoryStore",
    "InvalidIdError",
    "JobNotFoundError",
    "MessageBus",
    "NatsBus",
    "NodeProgress",
    "NodeState",
    "NotStartedError",
    "OpCache",
    "OpCacheEntry",
    "OpState",
    "OpStatus",
    "OpType",
    "OperationConflictError",
    "OperationFailed",
    "OperationHandle",
    "OperationRecord",
    "OperationsService",
    "PayloadTooLargeError",
    "PostgresGalleryStore",
    "Replica",
    "ReplicaConfig",
    "ReplistateError",
    "StoreError",
    "Subjects",
    "Subscription",
]

__version__ = "0.1.0"
