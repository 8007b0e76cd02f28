"""Durable stores: the `GalleryStore` protocol and its implementations."""

from replistate.store.base import ACTIVE_WINDOW, GalleryStore
from replistate.store.memory import InMemoryStore
from replistate.store.postgres import PostgresGalleryStore

__all__ = ["ACTIVE_WINDOW", "GalleryStore", "InMemoryStore", "PostgresGalleryStore"]
