"""The README's configuration table, generated from the settings classes and the CLI.

`python -m pangea.app.docs` prints it; a test checks that README.md contains it verbatim.
"""

from __future__ import annotations

from pangea import settings as s
from pangea.app.parser import build_parser

_CLASSES = [
    (s.BusSettings, "every role"),
    (s.TrainSettings, "run, reference, orchestrator"),
    (s.OrchestratorSettings, "orchestrator, run"),
    (s.PreprocessorSettings, "preprocessor"),
    (s.ReducerSettings, "reducer"),
    (s.WorkerSettings, "worker"),
    (s.RunSettings, "run"),
    (s.ReferenceSettings, "reference"),
    (s.ReplaySettings, "replay"),
    (s.VerifySettings, "verify"),
    (s.AutoscaleSettings, "autoscale"),
]
_DEFAULTS = {
    "PANGEA_OUT": "runs/<job> (run, replay), runs/reference (reference), DIR/verify (verify)",
    "PANGEA_JOB": "pangea (a generated name for run)",
}
_USERS = {
    "PANGEA_DATASET": "run, reference, orchestrator, preprocessor and verify (override)",
    "PANGEA_DEVICE": "worker, run, replay, reference",
    "PANGEA_WORKERS": "orchestrator, run, replay, reference",
    "PANGEA_TORCH_THREADS": "worker, run, reference, autoscale (each worker it starts)",
    "PANGEA_MIN_WORKERS": "orchestrator, run, autoscale (its own bound)",
    "PANGEA_MAX_WORKERS": "orchestrator, run, autoscale (its own bound)",
    "PANGEA_STORE_DIR": "run, replay",
    "PANGEA_CODE_DIR": "run, reference, verify, orchestrator, worker (pangea.fit sets it)",
    "PANGEA_ALLOW_PICKLED_CODE": "worker (pangea.fit sets it for its own workers), verify, reference",
}


def _flags() -> set[str]:
    parser = build_parser()
    flags: set[str] = set()
    for sub in parser._subparsers._group_actions[0].choices.values():  # noqa: SLF001 - argparse has no API
        for action in sub._actions:  # noqa: SLF001
            flags.update(action.option_strings)
    return flags


def settings_table() -> str:
    flags = _flags()
    rows = ["| variable | flag | default | used by | meaning |", "|---|---|---|---|---|"]
    seen: set[str] = set()
    for cls, users in _CLASSES:
        for name, info in cls.model_fields.items():
            key = f"PANGEA_{name.upper()}"
            if key in seen:
                continue
            seen.add(key)
            default = _DEFAULTS.get(key, "unset" if info.default is None else str(info.default))
            flag = f"--{name.replace('_', '-')}"
            flag = f"`{flag}`" if flag in flags else "env only"
            rows.append(f"| `{key}` | {flag} | `{default}` | {_USERS.get(key, users)} | {info.description} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_table(), end="")
