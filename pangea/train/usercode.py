"""User code: the model, step, optimizer or task a user gives, by name or by value.

A spec names the code: `module:attribute` (the attribute may be dotted, `Class.method`) is
imported in every process that needs it, as `--model module:factory` always was.  What cannot
be imported there (a function or class defined in a notebook cell or in `__main__`, a lambda, a
closure, an `nn.Module` instance with its weights) is shipped by value: `ship` cloudpickles it
and names it by the sha256 of those bytes, `pickle:<sha256>`.

Where the bytes live: `<code_dir>/<sha256>.pkl` on the machine that made them (`pangea.fit`:
`<out>/code`, passed to every role as PANGEA_CODE_DIR); the orchestrator copies them into the
job's Object Store bucket (`pangea.roles.code`), from which a worker on another machine may fetch
them.  Every load checks the bytes against the name, so a file or object that was swapped is
refused, never run.

Unpickling runs code.  `resolve` does it only when its caller allows it (`allow_pickle`: a
worker's PANGEA_ALLOW_PICKLED_CODE, which `pangea run` and `pangea.fit` set for the workers they
start and a remote `pangea worker` must set itself); a refusal says which setting to change, or
to put the code in an importable module instead.  Pickled code needs the Python version and
packages of the machine that made it.

An `nn.Module` instance given as a model is always pickled by value, weights included (by name,
its weights would be whatever importing its module drew in each process).  Resolved, it is an
instance; `pangea.train.models` turns it into a factory that returns a deep copy, so its shipped
weights are the initial weights on every host and `--seed` does not re-draw them.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from pangea.errors import UserError

PICKLE = "pickle:"
_PICKLED = re.compile(r"pickle:([0-9a-f]{64})")
_ASK = "set PANGEA_ALLOW_PICKLED_CODE=true to run it here, or put the code in an importable module (module:attribute)"


def pickled_hash(spec: object) -> str | None:
    """The sha256 a `pickle:<sha256>` spec names, or None for anything else."""
    match = _PICKLED.fullmatch(spec) if isinstance(spec, str) else None
    return match.group(1) if match else None


def pickled_hashes(specs) -> list[str]:
    """The sha256 of every `pickle:` spec among `specs`, each once, in order."""
    return list(dict.fromkeys(h for h in map(pickled_hash, specs) if h))


def code_file(code_dir: Path | str, sha: str) -> Path:
    """Where pickled code `sha` is kept in a code directory."""
    return Path(code_dir) / f"{sha}.pkl"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ resolve


def resolve(
    spec: str,
    *,
    what: str,
    error: type[UserError],
    code_dir: Path | str | None = None,
    allow_pickle: bool = True,
) -> object:
    """The object `spec` names: `module:attribute` imported, `pickle:<sha256>` loaded from
    `code_dir` (checked against its hash).  Any failure is one line, `error(...)`, naming
    `spec` and `what` (the flag, e.g. "--model")."""
    sha = pickled_hash(spec)
    if sha is not None:
        return load(sha, what=what, error=error, code_dir=code_dir, allow_pickle=allow_pickle)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise error(f"{what} {spec!r}: expected module:attribute or pickle:<sha256>")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise error(f"cannot import {module_name!r} for {what} {spec}: {_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - user code failing as it is imported: one line
        raise error(f"importing {module_name!r} for {what} {spec} failed: {type(exc).__name__}: {_line(exc)}") from None
    found = module
    for part in attr.split("."):
        if not hasattr(found, part):
            raise error(f"{what} {spec}: {module_name} has no {attr!r}")
        found = getattr(found, part)
    return found


def load(
    sha: str,
    *,
    what: str,
    error: type[UserError],
    code_dir: Path | str | None,
    allow_pickle: bool,
) -> object:
    """Pickled code `sha` from `<code_dir>/<sha>.pkl`, if running pickled code is allowed here."""
    spec = PICKLE + sha
    if not allow_pickle:
        raise error(f"{what} {spec} is pickled code, and running pickled code is off here: {_ASK}")
    if code_dir is None:
        raise error(f"{what} {spec} is pickled code, but no CODE_DIR holds it: set PANGEA_CODE_DIR")
    path = code_file(code_dir, sha)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} {spec}: {path.name} not found in CODE_DIR: {code_dir}") from None
    except OSError as exc:
        raise error(f"{what} {spec}: cannot read {path}: {exc.strerror or exc}") from None
    return load_bytes(data, sha, what=what, error=error)


def load_bytes(data: bytes, sha: str, *, what: str = "code", error: type[UserError] = UserError) -> object:
    """Unpickle `data` after checking that its sha256 is `sha`; one line `error(...)` if not."""
    actual = sha256(data)
    if actual != sha:
        raise error(f"{what} {PICKLE}{sha}: refused, the bytes found have another sha256 ({actual})")
    import cloudpickle  # what made them (plain pickle reads them too; this keeps the pair together)

    try:
        return cloudpickle.loads(data)
    except Exception as exc:  # noqa: BLE001 - a missing package, another Python: one line
        raise error(
            f"{what} {PICKLE}{sha} cannot be unpickled here ({type(exc).__name__}: {_line(exc)}): pickled code "
            "needs the Python version and packages of the machine that made it"
        ) from None


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# ------------------------------------------------------------------ ship


def ship(obj: object, code_dir: Path | str) -> str:
    """A spec for `obj`: a string as it is; `module:qualname` for a function, class or method that
    a fresh process imports by that name as this very object; anything else pickled by value into
    `<code_dir>/<sha256>.pkl` (written atomically), as `pickle:<sha256>`."""
    if isinstance(obj, str):
        return obj
    name = importable_name(obj)
    if name is not None:
        return name
    data = dumps(obj)
    sha = sha256(data)
    write_code(data, sha, code_dir)
    return PICKLE + sha


def importable_name(obj: object) -> str | None:
    """`module:qualname` when `obj` is a function, class or method that importing that name gives
    back (here, and in a fresh process on this machine); None otherwise."""
    if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismethod(obj) or inspect.isbuiltin(obj)):
        return None  # instances (an nn.Module with its weights, a partial) travel by value
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None  # __main__, lambdas, closures: nothing another process could import
    found: object = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    same = found is obj or (inspect.ismethod(obj) and found == obj)  # a classmethod is bound anew each time
    if not same or not importable_fresh(module):
        return None
    return f"{module}:{qualname}"


def importable_fresh(module: str) -> bool:
    """Whether a fresh Python on this machine (this environment, this directory) imports `module`
    from the file this process has it from: a notebook's helper module may not be."""
    top = module.partition(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return True
    spec = getattr(sys.modules.get(top), "__spec__", None)
    origin = getattr(spec, "origin", None)
    if not origin:
        return False
    installed = {sysconfig.get_paths()[key] for key in ("purelib", "platlib", "stdlib")}
    if any(Path(origin).is_relative_to(path) for path in installed):
        return True
    return _fresh_origin(top, os.environ.get("PYTHONPATH", ""), os.getcwd()) == origin


@functools.lru_cache(maxsize=64)
def _fresh_origin(top: str, pythonpath: str, cwd: str) -> str:
    """Where a fresh interpreter finds module `top` ("" if nowhere); one subprocess per question:
    an editable install's finder or a .pth file is what decides, not this process's sys.path."""
    probe = "import importlib.util, sys; s = importlib.util.find_spec(sys.argv[1]); print(s and s.origin or '')"
    try:
        result = subprocess.run(
            [sys.executable, "-c", probe, top], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def dumps(obj: object) -> bytes:
    """`obj` cloudpickled by value, and with it the modules of its code that a fresh process could
    not import (`__main__` is always by value)."""
    import cloudpickle

    registered = set(cloudpickle.list_registry_pickle_by_value())
    added = []
    for module in _modules_of(obj):
        if module not in registered and module != "__main__" and module in sys.modules:
            if not importable_fresh(module):
                cloudpickle.register_pickle_by_value(sys.modules[module])
                registered.add(module)
                added.append(module)
    try:
        return cloudpickle.dumps(obj, protocol=5)
    finally:
        for module in added:
            cloudpickle.unregister_pickle_by_value(sys.modules[module])


def _modules_of(obj: object) -> list[str]:
    """Top-level modules whose code `obj` is made of: its own, its class's, and for an `nn.Module`
    the classes of its submodules."""
    things = [obj, type(obj)]
    children = getattr(obj, "modules", None)
    if callable(children) and not inspect.isclass(obj) and not inspect.ismodule(obj):
        try:
            things += [type(child) for child in children()]
        except Exception:  # noqa: BLE001 - not an nn.Module after all
            pass
    names = (getattr(thing, "__module__", None) for thing in things)
    return list(dict.fromkeys(name.partition(".")[0] for name in names if isinstance(name, str)))


def write_code(data: bytes, sha: str, code_dir: Path | str) -> Path:
    """Keep pickled code as `<code_dir>/<sha>.pkl` (mode 0600), written whole or not at all."""
    code_dir = Path(code_dir)
    path = code_file(code_dir, sha)
    if path.is_file() and sha256(path.read_bytes()) == sha:
        return path
    code_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=code_dir, prefix=f".{sha[:12]}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
