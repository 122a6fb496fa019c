"""User code by name or by value (pangea.train.usercode), and pickled code through a job's code
bucket on a real nats-server (pangea.roles.code)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import uuid

import pytest
import torch

from pangea.bus import subjects
from pangea.bus.client import Bus
from pangea.errors import ModelError, SettingsError, TaskError
from pangea.roles.code import fetch_code, publish_code
from pangea.settings import BusSettings
from pangea.train import models, usercode

_MODULE = textwrap.dedent(
    """
    import torch

    SCALE = 3

    def triple(x):
        return SCALE * x

    class Net(torch.nn.Module):
        def __init__(self, in_features=4, num_classes=2):
            super().__init__()
            self.linear = torch.nn.Linear(in_features, num_classes)

        def forward(self, x):
            return self.linear(x)

        @classmethod
        def build(cls, in_features, num_classes):
            return cls(in_features, num_classes)
    """
)

_MAIN = textwrap.dedent(
    """
    import json, sys
    import torch
    from pangea.train.usercode import ship

    WIDTH = 5

    def factory(in_features, num_classes):
        return torch.nn.Sequential(torch.nn.Linear(in_features, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, num_classes))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.linear(x)

    torch.manual_seed(7)
    instance = Net()
    code_dir = sys.argv[1]
    print(json.dumps({
        "factory": ship(factory, code_dir),
        "cls": ship(Net, code_dir),
        "instance": ship(instance, code_dir),
        "weight": instance.linear.weight.tolist(),
        "lambda": ship(lambda x: x + 1, code_dir),
        "mlp": ship("mlp", code_dir),
    }))
    """
)


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, text
    return text


@pytest.fixture
def module_file(tmp_path, monkeypatch):
    """A module in a directory only this process has on its path: a notebook's helper module."""
    name = f"pangea_user_code_{uuid.uuid4().hex[:8]}"
    where = tmp_path / "modules"
    where.mkdir()
    (where / f"{name}.py").write_text(_MODULE)
    monkeypatch.syspath_prepend(str(where))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    yield name, where
    sys.modules.pop(name, None)


def _resolve(spec: str, code_dir, **kw):
    return usercode.resolve(spec, what="--model", error=ModelError, code_dir=code_dir, **kw)


def test_pickled_hash_names_only_pickle_specs():
    sha = "ab" * 32
    assert usercode.pickled_hash(f"pickle:{sha}") == sha
    for spec in ("mlp", "pkg.mod:make", f"pickle:{sha[:-1]}", f"pickle:{sha.upper()}", None, 3):
        assert usercode.pickled_hash(spec) is None
    assert usercode.pickled_hashes(["mlp", f"pickle:{sha}", "", f"pickle:{sha}"]) == [sha]


def test_strings_and_importable_code_ship_by_name(tmp_path):
    code_dir = tmp_path / "code"
    assert usercode.ship("mlp", code_dir) == "mlp"
    assert usercode.ship("pkg.mod:make", code_dir) == "pkg.mod:make"
    assert usercode.ship(models.mlp, code_dir) == "pangea.train.models:mlp"
    assert usercode.ship(torch.optim.AdamW, code_dir) == "torch.optim.adamw:AdamW"
    assert not code_dir.exists()  # nothing was pickled


def test_a_module_on_a_fresh_path_ships_by_name_and_resolves_dotted(module_file, tmp_path, monkeypatch):
    name, where = module_file
    monkeypatch.setenv("PYTHONPATH", str(where))  # what the role processes would inherit
    module = __import__(name)
    code_dir = tmp_path / "code"
    assert usercode.ship(module.triple, code_dir) == f"{name}:triple"
    assert usercode.ship(module.Net, code_dir) == f"{name}:Net"
    assert usercode.ship(module.Net.build, code_dir) == f"{name}:Net.build"
    assert _resolve(f"{name}:Net.build", None) == module.Net.build
    model = models.build_model(f"{name}:Net.build", (2, 3), 4, (), seed=0)
    assert isinstance(model, module.Net) and model.linear.in_features == 6


def test_a_module_no_fresh_process_imports_is_pickled_by_value(module_file, tmp_path):
    name, where = module_file
    module = __import__(name)
    code_dir = tmp_path / "code"
    specs = [usercode.ship(thing, code_dir) for thing in (module.triple, module.Net)]
    hashes = [usercode.pickled_hash(spec) for spec in specs]
    assert all(hashes), specs
    assert sorted(p.name for p in code_dir.iterdir()) == sorted(f"{h}.pkl" for h in hashes)  # no temporary left
    assert usercode.ship(module.triple, code_dir) == specs[0]  # the same bytes, the same file
    sys.modules.pop(name)  # the module is gone: only a copy by value can come back
    sys.path.remove(str(where))
    triple = _resolve(specs[0], code_dir)
    assert triple(2) == 6
    net = models.build_model(specs[1], (4,), 2, (), seed=0, code_dir=code_dir)
    assert net(torch.zeros(3, 4)).shape == (3, 2)


def test_code_from_main_is_pickled_by_value_and_resolves_elsewhere(tmp_path):
    script = tmp_path / "notebook.py"
    script.write_text(_MAIN)
    code_dir = tmp_path / "code"
    result = subprocess.run(
        [sys.executable, str(script), str(code_dir)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shipped = json.loads(result.stdout)
    assert shipped["mlp"] == "mlp"
    for key in ("factory", "cls", "instance", "lambda"):
        assert usercode.pickled_hash(shipped[key]), shipped

    factory = _resolve(shipped["factory"], code_dir)
    assert factory(4, 3)(torch.zeros(2, 4)).shape == (2, 3)
    assert _resolve(shipped["lambda"], code_dir)(1) == 2
    a = models.build_model(shipped["factory"], (2, 2), 3, (), seed=1, code_dir=code_dir)
    b = models.build_model(shipped["factory"], (2, 2), 3, (), seed=1, code_dir=code_dir)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert models.build_model(shipped["cls"], (4,), 3, (), seed=0, code_dir=code_dir)(torch.zeros(1, 4)).shape == (1, 3)

    # An instance: a factory of copies, each with the shipped weights, whatever the seed.
    first = models.build_model(shipped["instance"], (4,), 3, (), seed=0, code_dir=code_dir)
    second = models.build_model(shipped["instance"], (4,), 3, (), seed=1, code_dir=code_dir)
    assert first is not second and first.linear.weight is not second.linear.weight
    assert first.linear.weight.tolist() == second.linear.weight.tolist() == shipped["weight"]


def test_pickled_code_with_other_bytes_or_missing_or_not_allowed_is_refused(tmp_path):
    code_dir = tmp_path / "code"
    spec = usercode.ship(lambda: torch.nn.Linear(2, 2), code_dir)
    sha = usercode.pickled_hash(spec)

    with pytest.raises(ModelError) as info:
        _resolve(spec, code_dir, allow_pickle=False)
    assert "PANGEA_ALLOW_PICKLED_CODE=true" in _one_line(info.value) and "importable module" in str(info.value)
    with pytest.raises(ModelError) as info:  # the same through the model builder
        models.build_model(spec, (2,), 2, (), seed=0, code_dir=code_dir, allow_pickle=False)
    assert "PANGEA_ALLOW_PICKLED_CODE" in _one_line(info.value)

    with pytest.raises(ModelError) as info:
        _resolve(spec, tmp_path / "elsewhere")
    assert "not found in CODE_DIR" in _one_line(info.value) and spec in str(info.value)
    with pytest.raises(ModelError) as info:
        _resolve(spec, None)
    assert "PANGEA_CODE_DIR" in _one_line(info.value)

    good = usercode.code_file(code_dir, sha).read_bytes()
    usercode.code_file(code_dir, sha).write_bytes(good + b"\x00")  # swapped for other bytes
    with pytest.raises(ModelError) as info:
        _resolve(spec, code_dir)
    assert "refused" in _one_line(info.value) and "sha256" in str(info.value)
    with pytest.raises(TaskError) as info:
        usercode.load_bytes(good[:-5], sha, what="--task", error=TaskError)
    assert "--task" in _one_line(info.value)
    assert callable(usercode.load_bytes(good, sha))


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("no_such_module_pangea_xyz:make", "cannot import"),
        ("pangea.train.models:no_such_factory", "has no 'no_such_factory'"),
        ("pangea.train.models:GPT.no_such_method", "has no 'GPT.no_such_method'"),
        ("no-colon", "expected module:attribute"),
    ],
)
def test_names_that_do_not_resolve_are_refused_in_one_line(spec, words):
    with pytest.raises(TaskError) as info:
        usercode.resolve(spec, what="--task", error=TaskError)
    text = _one_line(info.value)
    assert words in text and "--task" in text


def test_a_module_failing_as_it_is_imported_is_one_line(tmp_path, monkeypatch):
    name = f"pangea_broken_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("raise RuntimeError('no GPU\\nhere')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelError) as info:
        _resolve(f"{name}:make", None)
    assert "RuntimeError: no GPU here" in _one_line(info.value)
    sys.modules.pop(name, None)


def test_a_pickled_object_that_is_no_model_is_refused(tmp_path):
    spec = usercode.ship([1, 2, 3], tmp_path)
    with pytest.raises(ModelError) as info:
        models.build_model(spec, (2,), 2, (), seed=0, code_dir=tmp_path)
    assert "not a factory" in _one_line(info.value)


# ------------------------------------------------------------------ through the bus


def test_pickled_code_goes_through_the_jobs_code_bucket(nats_url, job, tmp_path):
    made_here = tmp_path / "code"
    spec = usercode.ship(lambda in_features, num_classes: torch.nn.Linear(in_features, num_classes), made_here)
    other = usercode.ship(lambda: torch.nn.Linear(1, 1), made_here)
    sha = usercode.pickled_hash(spec)
    specs = ["mlp", spec, other, "pangea.train.models:mlp"]

    async def main() -> None:
        bus = await Bus.connect(BusSettings(nats_url=nats_url, job=job), "test")
        bucket = subjects.code_bucket(job)
        try:
            assert await fetch_code(bus, ["mlp"], None, allow=False) is None  # nothing pickled: nothing asked
            with pytest.raises(SettingsError) as info:  # not stored yet
                await fetch_code(bus, specs, None, allow=True)
            assert "nor in the bucket" in _one_line(info.value)

            assert await publish_code(bus, specs, made_here) == [sha, usercode.pickled_hash(other)]
            assert sorted(await bus.list_objects(bucket)) == sorted([sha, usercode.pickled_hash(other)])
            await publish_code(bus, specs, made_here)  # again: already there, nothing stored twice
            assert await fetch_code(bus, specs, made_here, allow=False) == made_here  # all local: no fetch

            with pytest.raises(SettingsError) as info:  # another host, pickled code not allowed
                await fetch_code(bus, specs, tmp_path / "empty", allow=False)
            assert "PANGEA_ALLOW_PICKLED_CODE=true" in _one_line(info.value)

            fetched = await fetch_code(bus, specs, None, allow=True)
            assert fetched is not None and fetched != made_here
            assert (fetched.stat().st_mode & 0o077) == 0  # private to this user
            model = models.build_model(spec, (3,), 2, (), seed=0, code_dir=fetched)
            assert model(torch.zeros(1, 3)).shape == (1, 2)

            await bus.put_object(bucket, sha, b"not what the name says")  # a forged object
            with pytest.raises(SettingsError) as info:
                await fetch_code(bus, [spec], None, allow=True)
            assert "refused" in _one_line(info.value)
            with pytest.raises(SettingsError):
                await publish_code(bus, [spec], tmp_path / "empty")  # the orchestrator has no such file
            await publish_code(bus, [spec], made_here)  # the right bytes replace the forged ones
            assert usercode.sha256(await bus.get_object(bucket, sha)) == sha
        finally:
            await bus.delete_job()
            assert await bus.list_objects(bucket) == []  # the job's code went with it
            await bus.close()

    asyncio.run(main())
