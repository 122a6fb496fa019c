"""Pangea's error vocabulary, free of heavy imports.

Two families:

- `UserError`: a mistake a person can fix (a setting, a data set, a model, a job that is not what
  the command needs, a bus that refuses us).  The CLI prints it as one line and exits with its
  `exit_code`; a supervisor does not restart a role that exited so, since a restart cannot fix it.
- `Rejected`: a message refused on the normal path (counted, logged, the run goes on), always with
  one of the `Reason`s, the names `metrics.json` `rejected` and `/metrics` count them under.
"""

from __future__ import annotations

from enum import StrEnum


class UserError(Exception):
    """A mistake a person can fix, described in one line naming what to change."""

    exit_code = 2


EXIT_USER_ERROR = UserError.exit_code


class SettingsError(UserError, ValueError):
    """A configuration mistake: a setting, a flag, or settings that cannot go together."""


class DataError(UserError, ValueError):
    """A data set that cannot be loaded or trained on."""


class ModelError(UserError, ValueError):
    """A model spec that cannot be built, or builds another model than the job's."""


class TaskError(UserError, ValueError):
    """A task that cannot be used."""


class Diverged(UserError, ValueError):
    """Training produced non-finite parameters or gradients; the message says at which round."""


class JobError(UserError, LookupError):
    """A job on the bus is not what the command needs (missing, exists already, not replayable)."""


class Reason(StrEnum):
    """Why a message was refused: each is a counter in metrics.json `rejected` and /metrics."""

    MALFORMED = "malformed"  # not a Pangea message
    WRONG_TYPE = "wrong_type"  # a Pangea message of another kind
    OVERSIZED = "oversized"  # larger than the server's max payload
    WRONG_JOB = "wrong_job"
    STALE_GENERATION = "stale_generation"  # from before an orchestrator restart
    UNKNOWN_SENDER = "unknown_sender"  # not a member of the job
    NOT_THEIR_SHARD = "not_their_shard"
    UNKNOWN_SHARD = "unknown_shard"
    STALE_ROUND = "stale_round"
    FUTURE_ROUND = "future_round"
    STRAGGLER_LATE = "straggler_late"  # a re-issued or dropped shard's late copy: expected
    DUPLICATE = "duplicate"
    STALE_PARAMS = "stale_params"  # computed on other parameters than the round's
    FUTURE_PARAMS = "future_params"
    TOO_STALE = "too_stale"  # async: more updates old than --staleness
    WRONG_NAME = "wrong_name"
    WRONG_COMPRESSION = "wrong_compression"
    WRONG_DTYPE = "wrong_dtype"
    WRONG_SHAPE = "wrong_shape"
    WRONG_SAMPLES = "wrong_samples"
    NON_FINITE = "non_finite"


class Rejected(ValueError):
    """A contribution that must not reach the average: why (`reason`) and the details."""

    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason = Reason(reason)
        self.detail = detail
        super().__init__(f"{self.reason}: {detail}")
