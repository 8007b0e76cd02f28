"""Message buses: the `MessageBus` protocol and its implementations."""

from replistate.bus.base import BusState, Channel, MessageBus, Subscription
from replistate.bus.memory import InMemoryBroker, InMemoryBus
from replistate.bus.nats import NatsBus

__all__ = [
    "BusState",
    "Channel",
    "InMemoryBroker",
    "InMemoryBus",
    "MessageBus",
    "NatsBus",
    "Subscription",
]
