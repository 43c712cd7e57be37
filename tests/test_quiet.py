"""Quiet by default, in a terminal (issue 22 #4): with the dev extras installed (bitsandbytes,
kernels, opacus), a command run in a pseudo-terminal shows its own output and its progress bar,
and no third-party warning or log line tears them; ``-v`` lets them through.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

# What third-party chatter looks like when it leaks: Python warnings, transformers' loading bar,
# bitsandbytes' and kernels' log lines.
NOISE = ("Warning:", "warnings.warn", "Loading weights", "kernels-community", "bitsandbytes")


def in_a_terminal(*args: str, cwd: Path, limit_s: float = 240.0) -> tuple[int, str]:
    """Run ``chorus-node ARGS`` with stdin, stdout and stderr on one pseudo-terminal (as in a
    user's shell); return its exit code and everything it drew."""
    leader, follower = pty.openpty()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "xterm-256color", "COLUMNS": "100"}
    proc = subprocess.Popen([sys.executable, "-m", "chorus_p2p.cli.main", *args], cwd=cwd,
                            stdin=follower, stdout=follower, stderr=follower, env=env,
                            close_fds=True)
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + limit_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    data = os.read(leader, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    return code, b"".join(chunks).decode(errors="replace")


def test_commands_in_a_terminal_show_their_bar_and_no_third_party_noise(tmp_path):
    code, drawn = in_a_terminal("make-tiny-model", "--out", "tiny", "--pretrain-steps", "40",
                                cwd=tmp_path)
    assert code == 0, drawn[-3000:]
    assert "pretraining" in drawn and "steps" in drawn  # the bar was drawn (then erased)
    assert "tiny Llama + tokenizer -> tiny" in drawn
    leaked = [n for n in NOISE if n in drawn]
    assert not leaked, (leaked, drawn[-3000:])
    # training loads PEFT, which imports bitsandbytes (and kernels) when installed
    code, drawn = in_a_terminal("simulate", "--model", "tiny", "--clients", "2", "--rounds",
                                "1", "--steps", "2", cwd=tmp_path)
    assert code == 0, drawn[-3000:]
    assert "round 1" in drawn
    leaked = [n for n in NOISE if n in drawn]
    assert not leaked, (leaked, drawn[-3000:])


def test_verbose_lets_third_party_warnings_through(tmp_path, tiny_lm_dir):
    """The silence is a filter, not a loss: ``-v`` shows what was hidden."""
    pytest.importorskip("bitsandbytes")
    code, drawn = in_a_terminal("-v", "simulate", "--model", str(tiny_lm_dir), "--clients", "2",
                                "--rounds", "1", "--steps", "2", cwd=tmp_path)
    assert code == 0, drawn[-3000:]
    assert any(n in drawn for n in NOISE), drawn[-3000:]
