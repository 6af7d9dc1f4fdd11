"""Dialogs, their messages and outputs, stored in SQLite; ipynb import/export; the model context builder."""

from .store import (MESSAGE_TYPES, Conflict, InvalidInput, NotFound, Store, StoreError,
                    default_data_dir, lone_surrogate)

__all__ = ["MESSAGE_TYPES", "Conflict", "InvalidInput", "NotFound", "Store", "StoreError", "default_data_dir",
           "lone_surrogate"]
