"""Pickled user code on the bus: the orchestrator stores it, a worker on another machine fetches it.

A `pickle:<sha256>` spec (a model, step, optimizer or task that `pangea.fit` shipped by value,
`pangea.train.usercode`) names a file `<code_dir>/<sha256>.pkl` on the machine that made it.
`publish_code` copies each into the job's code bucket as object `<sha256>`; `fetch_code` gives a
worker a directory holding every file its job needs: its own code directory when it has them all
(workers started next to the orchestrator), else a private temporary one filled from the bucket,
if the worker allows pickled code.  Every file is checked against its name, and the bytes are
run only later, by `usercode.resolve`, which checks them again.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pangea.bus import subjects
from pangea.errors import SettingsError
from pangea.train import usercode

if TYPE_CHECKING:
    from pangea.bus.client import Bus

log = logging.getLogger(__name__)


async def publish_code(bus: Bus, specs: Iterable[str], code_dir: Path | None) -> list[str]:
    """Store each pickled spec's `<code_dir>/<sha>.pkl` in the job's code bucket as `<sha>` (kept
    when the bucket holds those bytes already); the hashes stored or found."""
    hashes = usercode.pickled_hashes(specs)
    if not hashes:
        return []
    if code_dir is None:
        raise SettingsError(f"{usercode.PICKLE}{hashes[0]} is pickled code, but no PANGEA_CODE_DIR holds it")
    bucket = subjects.code_bucket(bus.job)
    for sha in hashes:
        path = usercode.code_file(code_dir, sha)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SettingsError(
                f"{usercode.PICKLE}{sha}: cannot read {path.name} in CODE_DIR {code_dir}: {exc.strerror or exc}"
            ) from None
        if usercode.sha256(data) != sha:
            raise SettingsError(f"{usercode.PICKLE}{sha}: {path} holds other bytes (sha256 {usercode.sha256(data)})")
        if await bus.get_object(bucket, sha) == data:
            continue
        await bus.put_object(bucket, sha, data)
        log.info("stored pickled code %s (%d bytes) in %s", sha[:12], len(data), bucket)
    return hashes


async def fetch_code(bus: Bus, specs: Iterable[str], code_dir: Path | None, allow: bool) -> Path | None:
    """The directory holding every pickled spec's `<sha>.pkl`: `code_dir` when it has them all,
    else a private temporary directory (removed when this process exits) filled from the job's
    code bucket, each object checked against its hash.  One line (`SettingsError`) when this
    process may not run pickled code (`allow` false) or an object is missing."""
    hashes = usercode.pickled_hashes(specs)
    if not hashes or (code_dir is not None and all(usercode.code_file(code_dir, h).is_file() for h in hashes)):
        return code_dir
    where = f"job {bus.job!r}'s"
    if not allow:
        raise SettingsError(
            f"{where} code {usercode.PICKLE}{hashes[0]} is pickled: running it lets whoever may write the job's "
            "bucket run code here; set PANGEA_ALLOW_PICKLED_CODE=true to trust it, or put the code in an "
            "importable module (module:attribute)"
        )
    bucket = subjects.code_bucket(bus.job)
    target = Path(tempfile.mkdtemp(prefix="pangea-code-"))  # 0700: this user's only
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    for sha in hashes:
        local = usercode.code_file(code_dir, sha) if code_dir is not None else None
        if local is not None and local.is_file():
            shutil.copyfile(local, usercode.code_file(target, sha))
            continue
        data = await bus.get_object(bucket, sha)
        if data is None:
            raise SettingsError(
                f"{where} code {usercode.PICKLE}{sha} is neither in CODE_DIR ({code_dir}) nor in the bucket {bucket}"
            )
        if usercode.sha256(data) != sha:
            raise SettingsError(f"{where} code {usercode.PICKLE}{sha}: refused, {bucket} holds other bytes under it")
        usercode.write_code(data, sha, target)
        log.info("fetched pickled code %s (%d bytes) from %s", sha[:12], len(data), bucket)
    return target
