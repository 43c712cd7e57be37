"""Run a Flower app on this machine: a SuperLink and N SuperNodes on 127.0.0.1, then ``flwr run``.

Flower's deployment engine, as a lab would run it across machines, squeezed onto loopback: what
the tests and ``benchmarks/vs_flower.py`` use, and the quickest way to try ``examples/flower``::

    python -m chorus_p2p.flower.local_run examples/flower --nodes 3 -c 'num-server-rounds=2'

Offline by construction: the SuperLink runs with ``--disable-runtime-dependency-installation``
(else it tries ``uv sync`` from the network for every run) and the apps use this interpreter's
packages; telemetry and update checks are off; Flower's state (``FLWR_HOME``) lives in a
temporary folder, never in ``~/.flwr``. Every process is bound to 127.0.0.1 on free ports and
killed, with its process group, on exit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chorus_p2p.netlab import free_loopback_ports

FINISHED = "Strategy execution finished"
CONNECTION = "local"


def _tool(name: str) -> str:
    """The console script beside this interpreter (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


class LocalFlower:
    """SuperLink + SuperNodes on loopback, as a context manager. ``node_config(i)`` gives each
    SuperNode's ``--node-config`` (default: ``partition-id=i num-partitions=N``)."""

    def __init__(self, nodes: int = 3, node_config=None, workdir: str | Path | None = None,
                 env: dict[str, str] | None = None):
        self.nodes = nodes
        self.node_config = node_config or (lambda i: f"partition-id={i} num-partitions={nodes}")
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="chorus-flower-"))
        self.home = self.dir / "flwr-home"
        self.logs = self.dir / "logs"
        # Flower's processes start further ones (flower-superexec, flwr-serverapp) by name
        bin_dir = str(Path(sys.executable).parent)
        path = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
        self.env = {**os.environ, "PATH": path, "FLWR_HOME": str(self.home),
                    "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.procs: list[subprocess.Popen] = []
        self.port = 0

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                           env=self.env, start_new_session=True))
        log.close()

    def __enter__(self) -> "LocalFlower":
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        ports = free_loopback_ports(1 + self.nodes)
        self.port = ports[0]
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        try:
            self._spawn("superlink", [_tool("flower-superlink"), "--insecure", "--host",
                                      "127.0.0.1", "--port", str(self.port),
                                      "--disable-runtime-dependency-installation"])
            self._wait_for_port(self.port, 60)
            for i in range(self.nodes):
                self._spawn(f"supernode-{i}", [
                    _tool("flower-supernode"), "--insecure", "--superlink",
                    f"127.0.0.1:{self.port}", "--host", "127.0.0.1", "--port", str(ports[1 + i]),
                    "--node-config", self.node_config(i)])
        except BaseException:
            self.close()
            raise
        return self

    def _wait_for_port(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise RuntimeError(f"the SuperLink exited: {self.log('superlink')[-2000:]}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"the SuperLink did not listen on 127.0.0.1:{port} in {timeout:g}s")

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def run(self, app: str | Path, config: dict[str, object] | None = None,
            timeout: float = 600) -> str:
        """``flwr run APP`` to the end; returns its output. Raises if the strategy did not
        finish (``flwr run`` itself exits 0 even when the ServerApp failed)."""
        overrides = " ".join(f"{k}={_toml(v)}" for k, v in (config or {}).items())
        cmd = [_tool("flwr"), "run", str(app), CONNECTION, "--stream"]
        if overrides:
            cmd += ["--run-config", overrides]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        output = done.stdout + done.stderr
        (self.logs / "flwr-run.log").write_text(output)
        if FINISHED not in output:
            raise RuntimeError(f"the Flower run did not finish (exit {done.returncode}); its "
                               f"output ends:\n{output[-3000:]}\nlogs in {self.logs}")
        return output

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chorus_p2p.flower.local_run",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("app", help="the Flower app folder (its pyproject.toml)")
    parser.add_argument("--nodes", type=int, default=3, help="SuperNodes to start (default 3)")
    parser.add_argument("-c", "--config", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run config value (repeatable)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds (default 1800)")
    args = parser.parse_args(argv)
    config = {}
    for item in args.config:
        key, _, value = item.partition("=")
        try:
            config[key] = int(value)
        except ValueError:
            try:
                config[key] = float(value)
            except ValueError:
                config[key] = value.strip('"')
    with LocalFlower(args.nodes) as flower:
        try:
            output = flower.run(args.app, config, args.timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
