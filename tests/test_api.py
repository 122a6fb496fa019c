"""Pangea from Python (pangea.app.api): `pangea.fit` with a model defined in a script's __main__,
shipped by value to the workers, equals `pangea.reference` with the same settings and code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import pangea
from pangea.errors import JobError, SettingsError
from pangea.train import usercode
from pangea.train.exactness import compare

TOLERANCE = 1e-6  # tests/yardstick.py's

_SCRIPT = textwrap.dedent(
    """
    import json, sys

    import pangea  # first: the MKL settings hold for every matmul
    from torch import nn

    def factory(in_features, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 32), nn.ReLU(), nn.Linear(32, num_classes))

    if __name__ == "__main__":
        url, job, out = sys.argv[1:4]
        run = pangea.fit(model=factory, workers=2, epochs=2, nats_url=url, job=job, out=out)
        print(json.dumps({"model": run.settings["model"], "code_dir": run.settings["code_dir"], "final": run.final}))
    """
)

# The yardstick in a fresh interpreter, as tests/yardstick.py runs it (and for its reason).
_REFERENCE = (
    "import sys, pangea; "
    "pangea.reference(model=sys.argv[1], code_dir=sys.argv[2], workers=2, epochs=2, out=sys.argv[3])"
)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PANGEA_")}


@pytest.mark.slow  # ~25 s: a run and a reference (the default suite keeps the refusals below)
def test_fit_ships_a_model_from_main_and_equals_its_reference(nats_url, job, tmp_path):
    script, out, ref = tmp_path / "train.py", tmp_path / "run", tmp_path / "ref"
    script.write_text(_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), nats_url, job, str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=_env(),
    )
    print(result.stdout)
    assert result.returncode == 0, result.stderr[-4000:]
    shipped = json.loads(result.stdout.strip().splitlines()[-1])
    sha = usercode.pickled_hash(shipped["model"])
    assert sha, shipped
    assert shipped["code_dir"] == str((out / "code").absolute())
    assert usercode.code_file(out / "code", sha).is_file()
    assert shipped["final"]["test_accuracy"] > 0.5

    result = subprocess.run(
        [sys.executable, "-c", _REFERENCE, shipped["model"], shipped["code_dir"], str(ref)],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    diff = compare(out, ref)
    print(f"max |run - reference| = {diff:g}")
    assert diff <= TOLERANCE

    run = pangea.Run.load(out)
    model = run.model()  # the factory from __main__, rebuilt here with the final weights
    state = model.state_dict()
    assert all(np.array_equal(state[name].numpy(), value) for name, value in run.params.items())
    assert model(torch.zeros(3, 64)).shape == (3, 10)


def test_unknown_settings_are_refused_by_name(tmp_path):
    with pytest.raises(SettingsError) as info:
        pangea.fit(out=tmp_path, epoch=3, learning_rate=0.1)
    text = str(info.value)
    assert "\n" not in text and "epoch, learning_rate" in text
    with pytest.raises(SettingsError) as info:
        pangea.reference(out=tmp_path, job="j")  # a run's setting, not the reference's
    assert "job" in str(info.value)


def test_pickled_code_under_secure_or_disallowed_is_refused_before_anything_starts(tmp_path):
    def factory(in_features, num_classes):
        return torch.nn.Linear(in_features, num_classes)

    with pytest.raises(SettingsError) as info:
        pangea.fit(model=factory, out=tmp_path / "a", secure="password")
    assert "PANGEA_ALLOW_PICKLED_CODE" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SettingsError) as info:
        pangea.fit(model=factory, out=tmp_path / "b", allow_pickled_code=False)
    assert "allow_pickled_code is false" in str(info.value)
    assert not (tmp_path / "a" / "logs").exists() and not (tmp_path / "b" / "logs").exists()


def test_a_directory_without_a_run_is_one_line(tmp_path):
    with pytest.raises(JobError) as info:
        pangea.Run.load(tmp_path)
    assert "no finished run" in str(info.value)


def test_verifying_a_directory_that_trained_pickled_code_asks_first(tmp_path):
    """`pangea verify DIR` would run DIR/code's bytes, checked against names DIR also supplies: only
    with PANGEA_ALLOW_PICKLED_CODE (pangea.verify of your own run allows it)."""
    from pangea.train.exactness import recompute_settings

    metrics = {"settings": {"model": "pickle:" + "ab" * 32}}
    with pytest.raises(SettingsError) as info:
        recompute_settings(tmp_path, metrics, tmp_path / "v", None)
    assert "PANGEA_ALLOW_PICKLED_CODE" in str(info.value) and "\n" not in str(info.value)
    assert (
        recompute_settings(tmp_path, metrics, tmp_path / "v", None, allow_pickle=True).model
        == metrics["settings"]["model"]
    )
