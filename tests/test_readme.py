"""README as a script: its walkthrough blocks run in order, so a walkthrough that breaks fails CI.

The blocks marked ``<!-- readme-test -->`` run as one bash script (``set -euo pipefail``) in a
fresh folder with this venv's ``chorus-node`` and ``python`` first on PATH. What README says the
test changes, and nothing else: ``./Llama-3.2-3B`` is the tiny Llama (with its tokenizer), the
adapters the commands name are tiny PEFT adapters made for it, port 8470 is a free loopback port
and mDNS is off (``CHORUS_MDNS=0``: tests never multicast on the host's interfaces).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chorus_p2p.netlab import free_loopback_ports
from chorus_p2p.tiny import make_client_adapter

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- readme-test -->"
pytestmark = pytest.mark.timeout(600)


def marked_blocks(text: str) -> list[str]:
    blocks = re.findall(re.escape(MARKER) + r"\s*```bash\n(.*?)```", text, re.S)
    assert blocks, f"no {MARKER} blocks in README"
    return blocks


def test_readme_walkthrough_runs_as_written(tmp_path, tiny_lm_dir):
    work = tmp_path / "walkthrough"
    work.mkdir()
    shutil.copytree(tiny_lm_dir, work / "Llama-3.2-3B")
    model = work / "Llama-3.2-3B"
    targets = ("q_proj", "v_proj")
    for name, rank, seed in (("alice-adapter", 16, 1), ("bob-adapter", 16, 2), ("carol", 8, 3)):
        make_client_adapter(model, work / name, seed=seed, rank=rank, alpha=2.0 * rank,
                            target_modules=targets)
    (port,) = free_loopback_ports(1)
    script = "\n".join(marked_blocks(README.read_text())).replace("8470", str(port))
    (work / "walkthrough.sh").write_text(
        "set -euo pipefail\n"
        "trap 'jobs -p | xargs -r kill 2>/dev/null || true' EXIT\n" + script)
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", CHORUS_MDNS="0",
               CHORUS_PORT=str(port), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # Output to files, not pipes: a background node that outlived a failure would hold a pipe
    # open and hang the test instead of failing it.
    with open(work / "out.txt", "w") as out, open(work / "err.txt", "w") as err:
        code = subprocess.run(["bash", str(work / "walkthrough.sh")], cwd=work, env=env,
                              stdout=out, stderr=err, timeout=540).returncode
    done = subprocess.CompletedProcess([], code, (work / "out.txt").read_text(),
                                       (work / "err.txt").read_text())
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-4000:])
    # What the walkthrough promised happened:
    assert (work / "round-7" / "residual.safetensors").is_file()
    assert (work / "base-r7" / "config.json").is_file()
    assert {"adapter_model.safetensors", "residual.safetensors", "cumulative.safetensors"} <= {
        p.name for p in (work / "global").iterdir()}
    assert "coordinator" in done.stdout and "paused=True" in done.stdout
    assert "committed" in done.stdout
