"""How long a client command takes from the shell, start to exit.

A lab user types ``chorus-node status`` dozens of times a day and scripts call it in loops, so
client commands must not pay for torch (seconds of imports). This starts one node on loopback
(tiny model, no mDNS) and times, as whole processes, median of ``--repeat`` (10) runs each:

- ``python -c pass``: the floor every Python command pays;
- ``chorus-node --help`` and ``chorus-node status --help``: parsing only;
- ``chorus-node status`` against the running node (a real signed HTTP call);
- ``chorus-node status`` against a dead port (the error path a user hits when the node is down).

Target: under 0.3 s wall for ``status --help`` and for the status call, on an idle machine.
It also reports whether torch was imported by the status command (it must not be).

Usage::

    python benchmarks/cli_startup.py
    python benchmarks/cli_startup.py --repeat 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from chorus_p2p.trust.identity import init_data_dir
from chorus_p2p.tiny import quiet_transformers, save_tiny_model

TARGET_S = 0.3
CLI = [sys.executable, "-m", "chorus_p2p.cli.main"]


def wall(cmd: list[str], env: dict[str, str], repeat: int) -> tuple[float, int]:
    """Median wall seconds of `cmd` over `repeat` runs, and the last exit code."""
    times, code = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        code = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).returncode
        times.append(time.perf_counter() - start)
    return statistics.median(times), code


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(root: Path) -> tuple[subprocess.Popen, str, Path]:
    model = save_tiny_model(root / "model")
    data = root / "node"
    init_data_dir(data, "startup")
    cmd = CLI + ["up", "--headless", "--no-mdns", "--port", "0", "--data-dir", str(data),
                 "--model", str(model), "--rank", "4", "--alpha", "8",
                 "--target-modules", "q_proj,v_proj"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        record = json.loads(line)
        if record.get("event") == "listening":
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, record["data"]["url"], data
    raise RuntimeError("the node exited before it listened")


def imports_torch(env: dict[str, str]) -> bool:
    probe = ("import runpy, sys; sys.argv = ['chorus-node', 'status']\n"
             "try:\n    runpy.run_module('chorus_p2p.cli.main', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    return "NO-TORCH" not in out.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    quiet_transformers()
    print(f"cli_startup: median of {args.repeat} runs each; {platform.machine()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, "
          f"Python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="chorus-startup-") as tmp:
        proc, url, data = start_node(Path(tmp))
        try:
            live = dict(os.environ, CHORUS_NODE=url, CHORUS_DATA_DIR=str(data))
            dead = dict(live, CHORUS_NODE=f"http://127.0.0.1:{free_port()}")
            rows = [
                ("python -c pass", [sys.executable, "-c", "pass"], live, None),
                ("chorus-node --help", CLI + ["--help"], live, None),
                ("chorus-node status --help", CLI + ["status", "--help"], live, TARGET_S),
                ("chorus-node status (live node)", CLI + ["status"], live, TARGET_S),
                ("chorus-node status (dead port)", CLI + ["status"], dead, None),
            ]
            floor = None
            for label, cmd, env, target in rows:
                median, code = wall(cmd, env, args.repeat)
                floor = floor or median
                verdict = "" if target is None else (
                    f"   target < {target:g} s: {'met' if median < target else 'NOT met'}")
                print(f"  {label:32s} {median * 1000:7.0f} ms   {median / floor:5.1f}x python"
                      f"   exit {code}{verdict}")
            print(f"  status imports torch: {'YES (regression)' if imports_torch(live) else 'no'}")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
