"""README as a script: its walkthrough blocks run in order, exactly as printed, so a walkthrough
that breaks fails CI; and no block of code in README goes unchecked.

The bash and Python blocks marked ``<!-- readme-test -->`` run as one bash script
(``set -euo pipefail``; a Python block as ``python - <<EOF`` with its text as printed) in an
empty folder with this venv's ``chorus-node`` and ``python`` first on PATH. Where this machine
can make network namespaces (root, iproute2) the script runs inside one the test creates (a LAN
veth and loopback): the printed port 8470 is free there, and ``up`` runs the default path, mDNS
on all interfaces, which never reaches the host's own. Elsewhere it runs on the host with mDNS
off and the port replaced by a free one (tests never multicast on the host's interfaces).

Every other bash or Python block carries one of: ``readme-tested-by: FILE[::TEST] ...`` (the
test that runs what it shows, which must exist), ``readme-excerpt-of: FILE ...`` (each code line
is in those files, so an excerpt cannot drift from the code that runs), or ``readme-not-run:
WHY``. The same holds for TOML blocks that name a file.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from chorus_p2p.netlab import NetLab, free_loopback_ports, namespaces_unavailable

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- readme-test -->"
pytestmark = pytest.mark.timeout(600)


BLOCK = re.compile(r"(?:<!-- (readme-[a-z-]+)(?::\s*(.*?))? -->\n[ \t]*)?```(\w*)\n(.*?)```",
                   re.S)
PYTHON_END = "README_PYTHON_BLOCK"


def readme_blocks(text: str) -> list[tuple[str | None, str, str, str]]:
    """(marker, its argument, language, code) of every fenced block, in order."""
    return [(m.group(1), (m.group(2) or "").strip(), m.group(3), textwrap.dedent(m.group(4)))
            for m in BLOCK.finditer(text)]


def marked_blocks(text: str) -> list[str]:
    """The walkthrough as bash: the marked blocks in order, Python ones as here-documents."""
    parts = []
    for marker, _, language, code in readme_blocks(text):
        if marker != "readme-test":
            continue
        assert language in ("bash", "python"), f"a {language!r} block cannot run: {code[:60]}"
        assert PYTHON_END not in code
        parts.append(code if language == "bash" else
                     f"python - <<'{PYTHON_END}'\n{code}{PYTHON_END}\n")
    assert parts, f"no {MARKER} blocks in README"
    return parts


def _write_script(work: Path, port: int | None = None) -> Path:
    script = "\n".join(marked_blocks(README.read_text()))
    if port is not None:
        script = script.replace("8470", str(port))
    path = work / "walkthrough.sh"
    # the ERR trap names the command that failed: under load, "exit 3" alone says little
    path.write_text("set -euo pipefail\n"
                    "trap 'echo \"walkthrough: exit $? from: $BASH_COMMAND\" >&2' ERR\n"
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
    failed = re.findall(r"^walkthrough: exit .*$", done.stderr, re.M)
    assert done.returncode == 0, (failed, done.stdout[-4000:], done.stderr[-4000:])
    assert (work / "round-7" / "residual.safetensors").is_file()
    assert (work / "base-r7" / "config.json").is_file()
    # the walkthrough pulled D and R too (the SDK block's pull replaced that folder since)
    assert re.search(r"^adapter of round \d+ -> global .*cumulative\.safetensors, "
                     r"residual\.safetensors\)$", done.stdout, re.M), done.stdout[-3000:]
    assert "coordinator" in done.stdout and "paused=True" in done.stdout
    assert "committed" in done.stdout
    # the Python SDK blocks: alice's round committed and was pulled, her noised update accepted
    committed = re.search(r"^round (\d+) committed; global/ is its adapter$", done.stdout, re.M)
    assert committed, done.stdout[-3000:]
    pulled = json.loads((work / "global" / "chorus_round.json").read_text())["round"]
    assert isinstance(pulled, int) and pulled >= int(committed.group(1)), pulled
    # ... and her noised update, alone among raw ones, left out for its norm as README says
    assert done.stdout.rstrip().splitlines()[-1] == "excluded", done.stdout[-1000:]
    ratio = re.search(r"update norm \S+ is (\S+) times the federation's recent scale",
                      done.stderr)
    assert ratio and 300 < float(ratio.group(1)) < 10_000, done.stderr[-2000:]
    assert len(json.loads(json.loads((work / "dp-budget.json").read_text())["dp_releases"])) == 1


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


ROOT = README.parent


def _code_lines(text: str) -> list[str]:
    """Lines of code with their comments and indentation gone; comment-only lines, blank ones
    and elisions (``...``) dropped."""
    lines = (re.sub(r"\s+#(\s.*)?$", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith(("#", "..."))]


def test_every_block_of_code_in_readme_runs_or_names_what_checks_it():
    unchecked, missing, drifted = [], [], []
    for marker, argument, language, code in readme_blocks(README.read_text()):
        if language not in ("bash", "python", "toml"):
            continue
        if marker is None:
            if language != "toml":  # a config sketch; a TOML block that names a file is checked
                unchecked.append(code.splitlines()[0])
        elif marker == "readme-tested-by":
            for target in argument.split():
                path, _, test = target.partition("::")
                source = ROOT / path
                if not source.is_file() or (test and not re.search(
                        rf"^(async )?def {re.escape(test)}\(", source.read_text(), re.M)):
                    missing.append(target)
        elif marker == "readme-excerpt-of":
            known = {line for path in argument.split()
                     for line in _code_lines((ROOT / path).read_text())}
            drifted += [line for line in _code_lines(code) if line not in known]
        elif marker == "readme-not-run":
            assert argument, "readme-not-run needs its reason"
        else:
            assert marker == "readme-test", f"unknown marker {marker}"
    assert not unchecked, f"README blocks with no readme-* marker: {unchecked}"
    assert not missing, f"README names tests that do not exist: {missing}"
    assert not drifted, f"README excerpts no longer in their files: {drifted}"


def test_the_markers_checker_finds_an_unmarked_block_and_a_drifted_excerpt():
    blocks = readme_blocks("<!-- readme-excerpt-of: a.py -->\n```python\nx = 1\n```\n"
                           "```bash\nchorus-node demo\n```\n")
    assert [(b[0], b[1], b[2]) for b in blocks] == [("readme-excerpt-of", "a.py", "python"),
                                                     (None, "", "bash")]
    assert _code_lines("  x = f(1)  # why\n# only a comment\n    ...)\n") == ["x = f(1)"]


@pytest.mark.skipif(NAMESPACES is not None, reason=NAMESPACES or "")
def test_the_netns_federation_script_runs_as_printed_and_cleans_up(tmp_path):
    """README's two lines: the script builds its namespaces and three nodes, lists them once
    all three are in, and the printed `members` command reaches node 0 from the host; SIGTERM
    (as Ctrl-C) removes every namespace and link it made."""
    block = next(code for marker, argument, _, code in readme_blocks(README.read_text())
                 if marker == "readme-tested-by" and "netns_federation_script" in argument)
    script_line, members_line = block.strip().splitlines()
    assert script_line == "sudo bash examples/netns-federation.sh"
    work = tmp_path / "netns"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")},
           "PYTHON": sys.executable, "WORK": str(work), "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "script.log", "w+")
    script = subprocess.Popen(["bash", str(ROOT / "examples" / "netns-federation.sh")],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while "Ctrl-C to stop" not in (tmp_path / "script.log").read_text():
            assert script.poll() is None, (tmp_path / "script.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "script.log").read_text()[-3000:]
            time.sleep(0.5)
        printed = (tmp_path / "script.log").read_text()
        assert printed.count("follower") == 2 and printed.count("coordinator") == 1, printed
        command = members_line.replace(".venv/bin/", f"{Path(sys.executable).parent}/").replace(
            "/tmp/chorus-netns", str(work)).split() + ["--json"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert len(json.loads(done.stdout)) == 3
    finally:
        os.killpg(script.pid, signal.SIGTERM)
        script.wait(timeout=60)
        log.close()
    left = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "chorus-c" not in left and "chorus-n" not in namespaces and "chorus-br" not in namespaces
