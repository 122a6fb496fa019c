"""The bus's one error: NATS is unreachable or refused an operation."""

from __future__ import annotations

from pangea.errors import UserError


class BusError(UserError, RuntimeError):
    """The bus is unreachable or refused an operation; the message says what to change."""


class ConsumerLost(BusError):
    """A consumer this role reads is gone from the server: its job was deleted, or the server
    restarted and lost a stream kept in memory (with what it held).  A role that can recover
    reopens the consumer (`Puller.reopen`) once the stream is back; otherwise it stops."""
