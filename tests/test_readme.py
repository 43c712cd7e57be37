"""README as a script: its walkthrough blocks run in order, exactly as printed, so a walkthrough
that breaks fails CI.

The blocks marked ``<!-- readme-test -->`` run as one bash script (``set -euo pipefail``) in an
empty folder with this venv's ``chorus-node`` and ``python`` first on PATH. Where this machine
can make network namespaces (root, iproute2) the script runs inside one the test creates (a LAN
veth and loopback): the printed port 8470 is free there, and ``up`` runs the default path, mDNS
on all interfaces, which never reaches the host's own. Elsewhere it runs on the host with mDNS
off and the port replaced by a free one (tests never multicast on the host's interfaces).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chorus_p2p.netlab import NetLab, free_loopback_ports, namespaces_unavailable

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- readme-test -->"
pytestmark = pytest.mark.timeout(600)


def marked_blocks(text: str) -> list[str]:
    blocks = re.findall(re.escape(MARKER) + r"\s*```bash\n(.*?)```", text, re.S)
    assert blocks, f"no {MARKER} blocks in README"
    return blocks


def _write_script(work: Path, port: int | None = None) -> Path:
    script = "\n".join(marked_blocks(README.read_text()))
    if port is not None:
        script = script.replace("8470", str(port))
    path = work / "walkthrough.sh"
    path.write_text("set -euo pipefail\n"
                    "trap 'jobs -p | xargs -r kill 2>/dev/null || true' EXIT\n" + script)
    return path


def _run(command: list[str], work: Path, **env_extra: str) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", **env_extra)
    # Output to files, not pipes: a background node that outlived a failure would hold a pipe
    # open and hang the test instead of failing it.
    with open(work / "out.txt", "w") as out, open(work / "err.txt", "w") as err:
        code = subprocess.run(command, cwd=work, env=env, stdout=out, stderr=err,
                              timeout=540).returncode
    return subprocess.CompletedProcess(command, code, (work / "out.txt").read_text(),
                                       (work / "err.txt").read_text())


def _check_promises(work: Path, done: subprocess.CompletedProcess) -> None:
    """What the walkthrough promised happened."""
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-4000:])
    assert (work / "round-7" / "residual.safetensors").is_file()
    assert (work / "base-r7" / "config.json").is_file()
    assert {"adapter_model.safetensors", "residual.safetensors", "cumulative.safetensors"} <= {
        p.name for p in (work / "global").iterdir()}
    assert "coordinator" in done.stdout and "paused=True" in done.stdout
    assert "committed" in done.stdout


NAMESPACES = namespaces_unavailable()


@pytest.mark.skipif(NAMESPACES is not None, reason=NAMESPACES or "")
def test_readme_walkthrough_runs_as_printed_with_mdns_in_a_namespace(tmp_path):
    work = tmp_path / "walkthrough"
    work.mkdir()
    script = _write_script(work)
    with NetLab(1) as lab:
        done = _run(["ip", "netns", "exec", lab.ns(0), "bash", str(script)], work)
    _check_promises(work, done)
    # the default path ran: mDNS advertised on every interface of the namespace
    assert "mDNS: advertising" in done.stderr and "on all" in done.stderr, done.stderr[-3000:]


@pytest.mark.skipif(NAMESPACES is None, reason="run in a namespace, with mDNS, instead")
def test_readme_walkthrough_runs_on_loopback_without_namespaces(tmp_path):
    work = tmp_path / "walkthrough"
    work.mkdir()
    (port,) = free_loopback_ports(1)
    done = _run(["bash", str(_write_script(work, port))], work, CHORUS_MDNS="0",
                CHORUS_PORT=str(port))
    _check_promises(work, done)
