"""The installed product: build the wheel, install it in a fresh venv, run it outside the checkout.

Offline: the wheel is built without build isolation (setuptools from this venv) and installed
with ``--no-index --no-deps``; the fresh venv sees the already-installed dependencies through
a plain path line in a ``.pth`` file (that adds this venv's site-packages to ``sys.path``
without running its ``.pth`` hooks, so the checkout's editable install stays invisible).
Every command then runs with the working directory outside the checkout, so nothing can be
found by accident in the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TUI_PILOT = """
import asyncio, importlib.util, sys
from chorus_p2p.tui.app import ChorusApp
from chorus_p2p.tui.state import FederationState

async def main():
    state = FederationState(connected=True, status={"federation": "wheel", "quorum": True},
                            members=[{"node_id": "ab" * 32, "name": "solo", "status": "live",
                                      "role": "coordinator", "addresses": []}])
    app = ChorusApp(None, state=state)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("question_mark")
        await pilot.pause()
        assert app.screen.__class__.__name__ == "HelpScreen", app.screen
    assert app.return_code in (None, 0), app.return_code

asyncio.run(main())
assert importlib.util.find_spec("tui") is None, "a generic top-level 'tui' package is installed"
print("tui pilot ok:", sys.modules["chorus_p2p.tui.app"].__file__)
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv", "venv", "build", "dist", "*.egg-info", ".git", "__pycache__", "*_data",
        ".pytest_cache", ".hypothesis", "snapshot_report.html"))
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "--disable-pip-version-check", "--quiet", "-w", str(wheels),
                    str(source)], check=True, capture_output=True, text=True)
    (wheel,) = wheels.glob("chorus_p2p-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True)
    Path(site.stdout.strip(), "_chorus_test_deps.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "--no-index", "--disable-pip-version-check", "--quiet", str(wheel)],
                   check=True, capture_output=True, text=True)
    outside = root / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return {"wheel": wheel, "venv": venv, "python": python, "cwd": outside, "env": env,
            "cli": venv / "bin" / "chorus-node"}


def run(installed: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=installed["cwd"], env=installed["env"],
                          capture_output=True, text=True, timeout=timeout)


def test_wheel_ships_the_tui_and_demo_data_under_chorus_p2p_only(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert top_level == {"chorus_p2p", installed["wheel"].name.split("-")[0] + "-"
                         + installed["wheel"].name.split("-")[1] + ".dist-info"}
    assert "chorus_p2p/tui/chorus.tcss" in names
    assert {"kitchen", "weather", "workshop", "instructions"} <= {
        Path(n).stem for n in names if n.startswith("chorus_p2p/demo_data/")
        and n.endswith(".jsonl")}
    packages = {str(p.parent.relative_to(REPO / "chorus_p2p")) for p in
                (REPO / "chorus_p2p").rglob("__init__.py")}
    shipped = {str(Path(n).parent.relative_to("chorus_p2p")) for n in names
               if n.startswith("chorus_p2p/") and n.endswith("__init__.py")}
    assert packages <= shipped, f"packages missing from pyproject: {packages - shipped}"


def test_installed_cli_runs_from_outside_the_checkout(installed):
    version = run(installed, installed["cli"], "--version")
    assert version.returncode == 0 and "chorus-p2p 0.1.0" in version.stdout
    where = run(installed, installed["python"], "-c", "import chorus_p2p; print(chorus_p2p.__file__)")
    assert where.returncode == 0 and str(installed["venv"]) in where.stdout, where
    model = run(installed, installed["cli"], "make-tiny-model", "--out",
                installed["cwd"] / "tiny", "--pretrain-steps", "2")
    assert model.returncode == 0, model.stderr[-3000:]
    assert (installed["cwd"] / "tiny" / "config.json").is_file()
    assert (installed["cwd"] / "tiny" / "tokenizer.json").is_file()
    experiment = installed["cwd"] / "experiment.toml"
    experiment.write_text('[experiment]\ntask = "topics"\nclients = 2\nseeds = [0]\n')
    check = run(installed, installed["cli"], "eval", experiment, "--check")
    assert check.returncode == 0 and "ok: the experiment" in check.stdout, check.stderr[-3000:]


def test_installed_demo_runs_one_round(installed):
    demo = run(installed, installed["cli"], "demo", "--rounds", "1", "--steps", "2",
               "--workdir", installed["cwd"] / "demo")
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "round 1" in demo.stdout.lower(), demo.stdout[-3000:]


def test_installed_tui_pilot_and_clean_failure(installed):
    pilot = run(installed, installed["python"], "-c", TUI_PILOT)
    assert pilot.returncode == 0, pilot.stderr[-3000:]
    assert str(installed["venv"]) in pilot.stdout and "Unclosed" not in pilot.stderr
    # No node there: a clear message and a non-zero exit, never a traceback.
    dead = run(installed, installed["cli"], "tui", "--node", "http://127.0.0.1:9",
               "--data-dir", installed["cwd"] / "no-such-node", timeout=60)
    assert dead.returncode != 0 and "Traceback" not in dead.stderr, dead.stderr[-2000:]
