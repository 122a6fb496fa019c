"""A nats-server whose JetStream storage is bounded (`max_file_store`, `max_memory_store`, as
every production server sets them): a job it has no room for, and a job that fills it mid-run, each end in one line
naming the stream and what frees space, with the user-error exit code and no restart; with
more room the job runs, or resumes, and verifies exact.

Each test starts its own nats-server (on a free loopback port, its store in tmp_path) with
the limit the test needs, and a bigger one on the same store afterwards, as an operator
raising the limit would."""

from __future__ import annotations

import subprocess

import pytest

from pangea.bus.server import EmbeddedServer
from pangea.errors import EXIT_USER_ERROR
from tests.helpers import role_env, run_pangea
from tests.yardstick import assert_verified


def _said(result: subprocess.CompletedProcess) -> str:
    """What `pangea run` printed, its console's wrapped lines joined back."""
    return " ".join((result.stdout + result.stderr).split())


def _stopped_for_storage(result: subprocess.CompletedProcess, *needles: str) -> None:
    said = _said(result)
    assert result.returncode == EXIT_USER_ERROR, said[-3000:]
    assert "Traceback" not in said and "restarting it" not in said, said[-3000:]
    for needle in needles:
        assert needle in said, (needle, said[-3000:])


@pytest.mark.slow
@pytest.mark.parametrize("derived", ["memory", "file"])
def test_a_server_too_small_for_the_job_is_one_line_then_the_job_runs(tmp_path, job, derived):
    """The parameter stream reserves four versions (~620 KB for digits' MLP) where the server
    keeps it: in memory (the default) or on file (PANGEA_DERIVED_STORAGE=file)."""
    store, limit = tmp_path / "store", f"max_{derived}_store"
    with EmbeddedServer(store, jetstream_limits=f"{limit}: 100KB") as small:
        refused = run_pangea(
            "run", "--job", job, "--workers", "1", "--epochs", "1", "--out", str(tmp_path / "a"),
            env=role_env(small.url, full_store_wait=5, derived_storage=derived),
        )  # fmt: skip
    _stopped_for_storage(
        refused, "cannot create stream", f"JetStream {derived} storage has no room for", limit, "pangea delete --job"
    )

    with EmbeddedServer(store, jetstream_limits=f"{limit}: 64MB") as bigger:
        ran = run_pangea(
            "run", "--job", job, "--workers", "1", "--epochs", "1", "--out", str(tmp_path / "b"),
            env=role_env(bigger.url, derived_storage=derived),
        )  # fmt: skip
    assert ran.returncode == 0, _said(ran)[-3000:]
    assert_verified(tmp_path / "b")


@pytest.mark.slow
def test_a_store_that_fills_mid_run_stops_in_one_line_and_the_job_resumes_exact(tmp_path, job):
    """The batch log fills a 1.5 MB store at about round 50 of 130: every role that cannot store
    waits PANGEA_FULL_STORE_WAIT seconds in all, then the first stops the job in one line.  On a
    store with room, --resume goes on from the last checkpoint to the end, exact."""
    store = tmp_path / "store"
    args = ("--job", job, "--workers", "2", "--epochs", "6", "--checkpoint-every", "5")
    with EmbeddedServer(store, jetstream_limits="max_file_store: 1536KB") as small:
        full = run_pangea(
            "run", *args, "--out", str(tmp_path / "a"), env=role_env(small.url, full_store_wait=5), timeout=400
        )
    _stopped_for_storage(
        full, "storage is full", "cannot take more", "PANGEA_BATCH_RETENTION_ROUNDS", "max_file_store", "--resume"
    )

    with EmbeddedServer(store, jetstream_limits="max_file_store: 64MB") as bigger:
        resumed = run_pangea(
            "run", *args, "--resume", "true", "--out", str(tmp_path / "b"), env=role_env(bigger.url), timeout=400
        )
    assert resumed.returncode == 0, _said(resumed)[-3000:]
    assert_verified(tmp_path / "b")
