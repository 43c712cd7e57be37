"""init, identity files, join tokens, settings precedence, and the client CLI's exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from chorus_p2p.cli.main import main
from chorus_p2p.errors import UsageError
from chorus_p2p.trust.identity import (decode_join_token, encode_join_token, init_data_dir,
                                      load_identity)
from chorus_p2p.node.settings import resolve_settings

from nodeutil import node_in_thread, run_cli, start_node, write_update


def test_init_creates_private_identity_and_refuses_to_overwrite(tmp_path, capsys):
    data = tmp_path / "d"
    assert main(["init", "--federation", "lab", "--data-dir", str(data), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    identity = load_identity(data)
    assert out["node_id"] == identity.node_id and len(identity.node_id) == 32
    for name in ("identity.key", "federation.json", "admin.token"):
        assert stat.S_IMODE(os.stat(data / name).st_mode) == 0o600, name
    assert decode_join_token(out["join_token"]) == ("lab", identity.secret)
    assert main(["init", "--federation", "lab", "--data-dir", str(data)]) == 2
    assert "already holds a node identity" in capsys.readouterr().err
    assert load_identity(data).node_id == identity.node_id
    assert main(["init", "--federation", "lab", "--data-dir", str(data), "--force"]) == 0
    assert load_identity(data).node_id != identity.node_id


def test_join_token_shares_the_federation(tmp_path, capsys):
    first = init_data_dir(tmp_path / "a", "lab")
    assert main(["init", "--join", first.join_token(), "--data-dir", str(tmp_path / "b")]) == 0
    second = load_identity(tmp_path / "b")
    assert second.federation == "lab" and second.secret == first.secret
    assert second.node_id != first.node_id
    for bad in ("nope", "chorus1.!!!", encode_join_token("lab", b"short")):
        with pytest.raises(UsageError):
            decode_join_token(bad)


def test_settings_flags_then_env_then_toml(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    (data / "config.toml").write_text('min_updates = 5\nport = 9000\nrank = 8\n'
                                      'target_modules = ["q_proj", "k_proj"]\n')
    env = {"CHORUS_PORT": "9100", "CHORUS_STRATEGY": "fedex"}
    s = resolve_settings({"data_dir": str(data), "port": 9200, "model": "m"}, env)
    assert (s.port, s.sources["port"]) == (9200, "flag")
    assert (s.strategy, s.sources["strategy"]) == ("fedex", "CHORUS_STRATEGY")
    assert s.min_updates == 5 and s.rank == 8 and s.target_modules == ("q_proj", "k_proj")
    s = resolve_settings({"data_dir": str(data)}, env)
    assert s.port == 9100
    (data / "config.toml").write_text("min_update = 3\n")
    with pytest.raises(UsageError, match=r"unknown setting\(s\) min_update \(did you mean "
                                          r"min_updates\?\)"):
        resolve_settings({"data_dir": str(data)}, {})
    # Issue 22 #6: the flag spellings work in the file too
    (data / "config.toml").write_text('no_mdns = true\npeer = "10.0.0.5:8470"\n'
                                      'interface = ["eth1"]\nsplit = "validation"\n')
    s = resolve_settings({"data_dir": str(data)}, {})
    assert (s.mdns, s.peers, s.interfaces, s.dataset_split) == (
        False, ("10.0.0.5:8470",), ("eth1",), "validation")
    (data / "config.toml").write_text("no_mdns = true\nmdns = true\n")
    with pytest.raises(UsageError, match="both no_mdns and mdns"):
        resolve_settings({"data_dir": str(data)}, {})
    with pytest.raises(UsageError, match="not one of"):
        resolve_settings({"data_dir": str(tmp_path)}, {"CHORUS_STRATEGY": "median"})
    with pytest.raises(UsageError, match="not a valid int"):
        resolve_settings({"data_dir": str(tmp_path)}, {"CHORUS_MIN_UPDATES": "many"})
    (data / "config.toml").write_text('quantize = "4bit"\n')
    assert resolve_settings({"data_dir": str(data)}, {}).quantize == "4bit"
    with pytest.raises(UsageError, match="one of 4bit, 8bit"):
        resolve_settings({"data_dir": str(tmp_path)}, {"CHORUS_QUANTIZE": "3bit"})


def test_up_refuses_a_different_federation_spec(tmp_path, tiny_base, capsys):
    init_data_dir(tmp_path / "d", "lab")

    async def once():
        node = await start_node(tmp_path / "d", tiny_base)
        await node.stop()

    asyncio.run(once())
    code = main(["up", "--data-dir", str(tmp_path / "d"), "--model", str(tiny_base), "--rank", "8",
                 "--port", "0", "--no-mdns"])
    assert code == 2 and "trains rank=4, not 8" in capsys.readouterr().err
    code = main(["up", "--data-dir", str(tmp_path / "fresh"), "--port", "0", "--no-mdns"])
    assert code == 2 and "no node identity here" in capsys.readouterr().err


@pytest.fixture
def running_node(tmp_path, tiny_base):
    with node_in_thread(tmp_path / "node", tiny_base) as node:
        yield node


def cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli(*args, env_extra=env_extra, timeout=120)


def test_cli_runs_a_round_and_reports_exit_codes(running_node, tmp_path):
    node = running_node
    base = ["--node", node.url, "--data-dir", str(node.data_dir)]
    token = node.identity.join_token()
    for i in range(2):
        update = write_update(tmp_path / f"u{i}.safetensors", node.spec, i)
        done = cli("submit", str(update), "--examples", "10", "--client-id", f"c{i}",
                   "--node", node.url, "--join", token)
        assert done.returncode == 0, done.stderr
        assert "accepted" in done.stdout
    done = cli("rounds", "--json", *base)
    rounds = json.loads(done.stdout)
    assert done.returncode == 0 and rounds[1]["round"] == 1
    done = cli("pull", "--out", str(tmp_path / "g"), "--round", "1", "--residual", *base)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in (tmp_path / "g").iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "residual.safetensors",
        "chorus_round.json"}
    assert json.loads((tmp_path / "g" / "chorus_round.json").read_text())["round"] == 1
    assert json.loads(cli("status", "--json", *base).stdout)["node_id"] == node.node_id
    assert json.loads(cli("members", "--json", *base).stdout)[0]["node_id"] == node.node_id
    assert "committed" in cli("rounds", *base).stdout
    # 3: refused by the server, with its message and code on one line
    done = cli("submit", str(tmp_path / "u0.safetensors"), "--examples", "10", "--client-id",
               "c0", "--round", "1", *base)
    assert done.returncode == 3 and "round_closed" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    # issue 22 #3: without --round, an update the federation overtook says what to do
    late = write_update(tmp_path / "late.safetensors", node.spec, 7)
    done = cli("submit", str(late), "--examples", "10", "--client-id", "late", "--trained-from",
               "0", *base)
    assert done.returncode == 3 and "moved on" in done.stderr, done.stderr
    assert "chorus-node pull" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    # without --round and no round collecting (here: paused after round 2 commits), submit
    # waits --wait seconds, says why, and sends nothing
    assert cli("pause", *base).returncode == 0
    for i in (8, 9):
        cli("submit", str(write_update(tmp_path / f"p{i}.safetensors", node.spec, i)),
            "--examples", "10", "--client-id", f"p{i}", *base)
    done = cli("submit", str(late), "--examples", "10", "--client-id", "waiter", "--wait", "1",
               *base)
    assert done.returncode == 3, done.stderr
    assert "waiting up to 1s" in done.stderr and "rounds are paused" in done.stderr
    assert "nothing was sent" in done.stderr
    assert all(u["node_id"] != "waiter" for r in node.ledger.list_rounds(limit=10)
               for u in node.ledger.updates(r["round"]))
    assert cli("resume", *base).returncode == 0
    done = cli("status", "--node", node.url, "--join", "chorus1." + "e30")
    assert done.returncode == 2
    done = cli("status", "--node", node.url, "--join", encode_join_token("lab", b"z" * 32))
    assert done.returncode == 3 and "bad_signature" in done.stderr
    # 4: nobody listening
    done = cli("status", "--node", "http://127.0.0.1:9", "--data-dir", str(node.data_dir))
    assert done.returncode == 4 and "cannot reach the node" in done.stderr


def test_ledger_migrates_an_old_schema(tmp_path):
    import sqlite3

    import sqlite_utils

    from chorus_p2p.node.ledger import MIGRATIONS, SCHEMA_VERSION, Ledger

    path = tmp_path / "ledger.sqlite"
    db = sqlite_utils.Database(sqlite3.connect(str(path), isolation_level=None))
    db["meta"].create({"key": str, "value": str}, pk="key")
    MIGRATIONS[1](db)
    db["meta"].insert({"key": "schema_version", "value": "1"})
    db["updates"].insert({"round": 1, "node_id": "old", "blob_sha": "a" * 64, "examples": 3,
                          "trained_from": 0, "size": 10, "norm": 1.0, "received_at": 0.0})
    db.close()
    ledger = Ledger(path)
    assert ledger.get_meta("schema_version") == str(SCHEMA_VERSION)
    row = ledger.update(1, "old")
    assert row["examples"] == 3 and row["eval_loss"] is None  # data kept, column added
    ledger.close()


def test_cli_walkthrough_admin_join_token_members_and_atomic_pull(running_node, tmp_path):
    node = running_node
    base = ["--node", node.url, "--data-dir", str(node.data_dir)]
    token = node.identity.join_token()
    # An admin command on the node's machine works with CHORUS_JOIN_TOKEN exported (README's
    # walkthrough exports it): the data dir's admin token is used.
    done = cli("pause", *base, env_extra={"CHORUS_JOIN_TOKEN": token})
    assert done.returncode == 0 and "paused=True" in done.stdout, done.stderr
    done = cli("resume", "--json", *base, env_extra={"CHORUS_JOIN_TOKEN": token})
    assert done.returncode == 0 and json.loads(done.stdout)["paused"] is False
    # With only a join token (another machine), an admin command is refused: exit 3, one line
    done = cli("pause", "--node", node.url, "--join", token, "--data-dir",
               str(tmp_path / "not-a-node"))
    assert done.returncode == 3 and "admin token" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    # join-token prints the token again, and only it, so it can go to a file
    done = cli("join-token", "--data-dir", str(node.data_dir))
    assert done.returncode == 0 and done.stdout.strip() == token
    # members: role and last-seen age columns
    done = cli("members", *base)
    header, row = done.stdout.splitlines()[:2]
    assert "role" in header and "last seen" in header and "coordinator" in row
    # pull is all or nothing: asking for a residual that round 0 does not have leaves no folder
    done = cli("pull", "--out", str(tmp_path / "p"), "--round", "0", "--residual", *base)
    assert done.returncode == 3 and not (tmp_path / "p").exists(), done.stderr
    assert not list(tmp_path.glob(".p.partial-*"))
    done = cli("pull", "--out", str(tmp_path / "p"), "--round", "0", "--json", *base)
    assert done.returncode == 0 and json.loads(done.stdout)["round"] == 0


def test_admin_capable_callers_prefer_the_data_dir_over_an_exported_token(tmp_path, monkeypatch):
    """`chorus-node tui` and admin commands pick credentials the same way: an explicit --join
    wins; otherwise the local data dir (it alone holds the admin token) beats
    $CHORUS_JOIN_TOKEN; a plain client command takes the exported token."""
    import argparse

    from chorus_p2p.cli.node_cmds import _credential_token

    local = init_data_dir(tmp_path / "node", "lab")
    token = init_data_dir(tmp_path / "other", "another-lab").join_token()  # another federation
    monkeypatch.setenv("CHORUS_JOIN_TOKEN", token)
    monkeypatch.setenv("CHORUS_DATA_DIR", str(tmp_path / "node"))

    def args(data_dir=None, join=None):
        return argparse.Namespace(data_dir=data_dir and str(tmp_path / data_dir), join=join,
                                  join_file=None)

    assert _credential_token(args(), admin=True) is None  # the data dir, with admin rights
    assert _credential_token(args(), admin=False) == token  # both from the environment
    assert _credential_token(args(join=token), admin=True) == token  # explicit wins
    assert _credential_token(args("none"), admin=True) == token  # no local node: the token
    # Issue 22 #7: a flag beats the environment. An explicit --data-dir that holds a node
    # signs with its own secret, not with another federation's exported token.
    assert _credential_token(args("node"), admin=False) is None
    assert _credential_token(args("node", join=token), admin=False) == token
    assert local.join_token() != token


def test_every_command_has_examples_that_parse_and_every_option_has_help():
    import argparse
    import shlex

    from chorus_p2p.cli.help import EXAMPLES
    from chorus_p2p.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(EXAMPLES)
    for name, command in sub.choices.items():
        assert "examples:" in command.format_help(), name
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name} {action.option_strings or action.dest}: no help"
        for _, line in EXAMPLES[name]:
            words = shlex.split(line.split("|")[0].split("&&")[0].split(">")[0])
            assert words[0] == "chorus-node" and words[1] == name, line
            parser.parse_args(words[1:])  # raises SystemExit on an example that rotted


def test_the_same_model_at_another_path_is_accepted_a_different_one_refused(tmp_path,
                                                                            tiny_base):
    import shutil

    from chorus_p2p.node.ledger import Ledger
    from chorus_p2p.node.service import load_or_create_spec
    from chorus_p2p.tiny import save_tiny_model

    def settings(model):
        return resolve_settings({"data_dir": str(tmp_path / "d"), "model": str(model),
                                 "rank": 4, "alpha": 8.0, "target_modules": "q_proj,v_proj"}, {})
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        first = load_or_create_spec(ledger, settings(tiny_base))
        moved = shutil.copytree(tiny_base, tmp_path / "elsewhere" / "same-model")
        spec = load_or_create_spec(ledger, settings(moved))
        assert spec.model == str(moved) and spec.fingerprint() == first.fingerprint()
        # remembered: the next start without --model uses the new path
        assert load_or_create_spec(ledger, resolve_settings(
            {"data_dir": str(tmp_path / "d")}, {})).model == str(moved)
        other = save_tiny_model(tmp_path / "other-weights", seed=1)  # same shapes, new weights
        with pytest.raises(UsageError, match="its content differs"):
            load_or_create_spec(ledger, settings(other))
    finally:
        ledger.close()


def fake_hub_download(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay ``folder`` out as huggingface_hub's cache holds a downloaded model (offline)."""
    import shutil

    commit = "0" * 40
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(folder, root / "snapshots" / commit)


def test_a_hub_id_and_its_local_copy_are_the_same_model(tmp_path, tiny_base, monkeypatch):
    """Started from a hub id, a lab later points --model at its downloaded copy (or the other
    way round): the configurations are compared, since one side's weights are not on disk.
    Another hub id with the same architecture is refused: nothing can tell them apart."""
    import shutil

    from chorus_p2p.node.ledger import Ledger
    from huggingface_hub import constants

    from chorus_p2p.node.service import load_or_create_spec

    # what HF_HUB_CACHE=... does for a fresh process (this one imported the hub library already)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hub_download(tmp_path / "hub", "lab/tiny-llama", tiny_base)
    fake_hub_download(tmp_path / "hub", "other/tiny-llama", tiny_base)

    def settings(model):
        return resolve_settings({"data_dir": str(tmp_path / "d"), "model": str(model),
                                 "rank": 4, "alpha": 8.0, "target_modules": "q_proj,v_proj"}, {})
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        load_or_create_spec(ledger, settings("lab/tiny-llama"))
        copy = shutil.copytree(tiny_base, tmp_path / "models" / "tiny-llama")
        assert load_or_create_spec(ledger, settings(copy)).model == str(copy)
        assert load_or_create_spec(ledger, settings("lab/tiny-llama")).model == "lab/tiny-llama"
        with pytest.raises(UsageError, match="cannot compare contents"):
            load_or_create_spec(ledger, settings("other/tiny-llama"))
        changed = shutil.copytree(tiny_base, tmp_path / "models" / "eps-changed")
        config = json.loads((changed / "config.json").read_text())
        (changed / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
        with pytest.raises(UsageError, match="its content differs"):
            load_or_create_spec(ledger, settings(changed))
    finally:
        ledger.close()


def test_reinit_to_join_another_federation_drops_the_old_admin_key(tmp_path):
    """A founder's data dir re-initialised with --force --join kept the old federation's admin
    key, and then would not load at all."""
    init_data_dir(tmp_path / "mine", "first")
    other = init_data_dir(tmp_path / "other", "second")
    joined = init_data_dir(tmp_path / "mine", join_token=other.join_token(), force=True)
    assert joined.federation == "second" and joined.admin_key is None
    assert joined.admin_public_key == other.admin_public_key


def _client_commands() -> dict[str, list[str]]:
    """Every command that talks to a node (it takes --node), with its first help example's
    arguments: the matrix below covers each, so a command that resolved on its own is caught."""
    import argparse
    import shlex

    from chorus_p2p.cli.help import EXAMPLES
    from chorus_p2p.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for name, command in sub.choices.items():
        if any("--node" in a.option_strings for a in command._actions):
            words = shlex.split(EXAMPLES[name][0][1].split("|")[0].split("&&")[0].split(">")[0])
            args = words[1:]
            while "--node" in args:  # the matrix sets it itself
                at = args.index("--node")
                del args[at:at + 2]
            out[name] = [w for w in args if not w.startswith("--node=")]
    return out


CLIENT_COMMANDS = _client_commands()


@pytest.mark.parametrize("command", sorted(CLIENT_COMMANDS))
def test_every_client_command_takes_flags_over_environment_over_the_data_dir(
        command, tmp_path, monkeypatch):
    """Issue 22: a flag beats the environment, which beats what the data dir says, for the
    node's URL, the data dir and the join token, in every command that talks to a node."""
    from chorus_p2p.cli.main import build_parser
    from chorus_p2p.cli.node_cmds import _data_dir, _join_token, _node_url
    from chorus_p2p.node.lock import DataDirLock

    for key in [k for k in os.environ if k.startswith("CHORUS_")]:
        monkeypatch.delenv(key)
    base = CLIENT_COMMANDS[command]
    parser = build_parser()
    local = tmp_path / "local"
    local.mkdir()
    with DataDirLock(local) as lock:  # a node running on the local data dir, at port 9001
        lock.describe(url="http://0.0.0.0:9001")

        def parse(*extra: str):
            return parser.parse_args([*base, "--data-dir", str(local), *extra])
        assert _node_url(parse()) == "http://127.0.0.1:9001"  # the data dir's running node
        monkeypatch.setenv("CHORUS_NODE", "http://10.0.0.7:8470")
        assert _node_url(parse()) == "http://10.0.0.7:8470"  # environment over the data dir
        assert _node_url(parse("--node", "10.0.0.5:8470")) == "http://10.0.0.5:8470"  # flag
    monkeypatch.setenv("CHORUS_DATA_DIR", str(tmp_path / "from-env"))
    assert _data_dir(parser.parse_args(base)) == str(tmp_path / "from-env")
    assert _data_dir(parse()) == str(local)
    monkeypatch.setenv("CHORUS_JOIN_TOKEN", "chorus1.from-env")
    assert _join_token(parse()) == "chorus1.from-env"
    assert _join_token(parse("--join", "chorus1.from-flag")) == "chorus1.from-flag"
    (tmp_path / "token").write_text("chorus1.from-file\n")
    assert _join_token(parse("--join-file", str(tmp_path / "token"))) == "chorus1.from-file"
