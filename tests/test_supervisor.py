"""`pangea run`'s restart policy (pure): a role killed now and then is restarted every time, one
that crash-loops is given up on."""

from __future__ import annotations

from pathlib import Path

from pangea.app.supervisor import MAX_RESTARTS, RESTART_WINDOW, Child


def _child() -> Child:
    return Child(name="worker-0", role="worker", proc=None, log_path=Path("worker-0.log"), env={})


def test_a_role_killed_every_15_s_is_restarted_every_time():
    child = _child()
    for i in range(40):  # ten minutes of the goodput benchmark's schedule, one worker in two
        now = 30.0 * i
        assert child.may_restart(now), i
        child.recent.append(now)


def test_a_crash_loop_is_given_up_on_and_forgiven_after_the_window():
    child = _child()
    for i in range(MAX_RESTARTS):
        assert child.may_restart(float(i))
        child.recent.append(float(i))
    assert not child.may_restart(float(MAX_RESTARTS))
    assert child.may_restart(MAX_RESTARTS + RESTART_WINDOW)  # the first restarts left the window
