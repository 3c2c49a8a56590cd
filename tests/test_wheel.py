"""A wheel built from the repository, installed outside it, has every preset and the bundled proxy."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from v2drop import list_presets

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import json, v2drop, v2drop.evaluation, v2drop.search
from v2drop import Method, list_presets
names = list_presets()
methods = {name: Method.from_preset(name).to_dict() for name in names}
lvlm = v2drop.load("proxy")
print(json.dumps({"file": v2drop.__file__, "presets": names, "methods": methods, "depth": lvlm.depth}))
"""


@pytest.mark.slow
@pytest.mark.integration
def test_installed_wheel_loads_every_preset_and_the_proxy(tmp_path):
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the repository.
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", "runs", "build", "*.egg-info", "__pycache__", "wandb", ".pytest_cache", "lightning_logs"
        ),
    )
    env = {**os.environ, "PIP_NO_INDEX": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("v2drop-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, env=env, cwd=tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", CHECK],
        env={**env, "PYTHONPATH": str(site)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(data["file"]).resolve().is_relative_to(site.resolve())
    assert data["presets"] and data["presets"] == list_presets()
    assert set(data["methods"]) == set(list_presets())
    assert data["depth"] > 0
