"""The bus's one error: NATS is unreachable or refused an operation."""

from __future__ import annotations

from pangea.errors import UserError


class BusError(UserError, RuntimeError):
    """The bus is unreachable or refused an operation; the message says what to change."""
