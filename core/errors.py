"""Errors typed by what the caller should do with them.

    FlywheelError
     +-- RetriableError      transient: back off and try again (broker unavailable, pool busy)
     +-- FatalError          misconfiguration or a broken invariant: stop the process loudly
     +-- DeadLetterError     this one record is bad: publish a DeadLetter with ``reason`` and move on
          +-- SerializationError   bytes that do not decode (bad magic byte, unknown schema id, bad Avro)
          +-- ValidationError      decodes, but breaks a contract (negative budget, empty prompt, ...)
     +-- IncompatibleSchemaError  a schema change the compatibility policy forbids (caller fixes the schema)

Consumers catch ``DeadLetterError`` per record, ``RetriableError`` around I/O, and let
``FatalError`` escape to the supervisor, which restarts the process.
"""

from __future__ import annotations


class FlywheelError(Exception):
    """Root of every error Flywheel raises on purpose."""

    retriable: bool = False


class RetriableError(FlywheelError):
    """A transient failure: the same call may succeed later."""

    retriable = True


class FatalError(FlywheelError):
    """The process cannot continue (bad configuration, broken invariant)."""


class DeadLetterError(FlywheelError):
    """One record cannot be processed; it goes to the stage's dead-letter topic with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SerializationError(DeadLetterError):
    """Bytes that cannot be decoded into an event."""


class ValidationError(DeadLetterError, ValueError):
    """An event that decodes but violates its contract."""


class IncompatibleSchemaError(FlywheelError):
    """Registering this schema would break the subject's compatibility policy."""

    def __init__(self, subject: str, messages: list[str]) -> None:
        detail = "; ".join(messages) if messages else "incompatible"
        super().__init__(f"schema for subject {subject!r} is incompatible: {detail}")
        self.subject = subject
        self.messages = messages
