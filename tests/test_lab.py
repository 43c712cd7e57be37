"""Deploying in a lab (issue 22): the shipped `examples/lab` files are valid, and a node that
the service manager restarts after a kill -9, with the same command and nothing else, carries
on training."""

from __future__ import annotations

import configparser
import json
import shutil
from pathlib import Path

import pytest

from chorus_p2p.netlab import NetLab, namespaces_unavailable, wait_until
from chorus_p2p.node.identity import init_data_dir
from chorus_p2p.node.ledger import Ledger
from chorus_p2p.node.settings import resolve_settings

from nodeutil import NodeProcess, wait_for

LAB = Path(__file__).resolve().parents[1] / "examples" / "lab"
SHARD = Path(__file__).resolve().parents[1] / "examples" / "data" / "kitchen.jsonl"


def test_the_lab_config_holds_every_setting_and_parses(tmp_path):
    shutil.copy(LAB / "config.toml", tmp_path / "config.toml")
    settings = resolve_settings({"data_dir": str(tmp_path)}, {})
    assert settings.train and settings.eval_data and settings.patience == 5
    assert settings.host == "0.0.0.0" and settings.port == 8470 and settings.keep_rounds == 20
    assert {k for k, v in settings.sources.items() if v.endswith("config.toml")} >= {
        "model", "rank", "alpha", "target_modules", "dataset", "steps", "device"}


def test_the_systemd_unit_runs_up_headless_and_restarts_only_on_failure():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(LAB / "chorus-node.service")
    service = unit["Service"]
    assert "chorus-node up --headless --data-dir" in service["ExecStart"]
    assert service["Restart"] == "on-failure" and service["RestartPreventExitStatus"] == "3"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_a_node_restarted_by_the_same_command_after_kill9_carries_on_training(tmp_path,
                                                                            tiny_lm_dir):
    """What the unit does after a crash: the same command, nothing else. The node trained and
    committed before the kill; after it, it trains and commits again from where it was."""
    data_dir = tmp_path / "node"
    init_data_dir(data_dir, "lab")
    (data_dir / "config.toml").write_text(
        f'model = "{tiny_lm_dir}"\ntarget_modules = ["q_proj", "v_proj"]\nmin_updates = 1\n'
        f'train = true\ndataset = "{SHARD}"\nsteps = 2\nmdns = false\n')

    def committed_with_my_update() -> int:
        return committed_with_the_nodes_update(data_dir)

    first = NodeProcess(data_dir, tiny_lm_dir, extra=[])
    first.start()
    wait_for_sync(lambda: committed_with_my_update() >= 2)
    first.kill9()
    before = committed_with_my_update()
    again = NodeProcess(data_dir, tiny_lm_dir, extra=[])
    again.start()
    try:
        wait_for_sync(lambda: committed_with_my_update() >= before + 2)
    finally:
        assert again.terminate() == 0


def committed_with_the_nodes_update(data_dir: Path) -> int:
    """Committed rounds that count the node's own update, read from its ledger."""
    ledger = Ledger(data_dir / "ledger.sqlite")
    try:
        me = {u["node_id"] for r in ledger.list_rounds(limit=1000)
              for u in ledger.updates(r["round"])}
        return max((ledger.rounds_contributed(n) for n in me), default=0)
    finally:
        ledger.close()


NAMESPACES = namespaces_unavailable()


@pytest.mark.skipif(NAMESPACES is not None, reason=NAMESPACES or "")
def test_in_a_namespace_the_units_command_restarted_after_kill9_carries_on_training(
        tmp_path, tiny_lm_dir):
    """The same, where a lab runs it: in a network namespace the test creates, with mDNS on
    every interface (the config sets nothing about discovery) and the unit's command, started
    again unchanged after a kill -9."""
    data_dir = tmp_path / "node"
    init_data_dir(data_dir, "lab")
    (data_dir / "config.toml").write_text(
        f'model = "{tiny_lm_dir}"\ntarget_modules = ["q_proj", "v_proj"]\nmin_updates = 1\n'
        f'train = true\ndataset = "{SHARD}"\nsteps = 2\n')
    with NetLab(1) as lab:
        first = lab.start(0, data_dir, tiny_lm_dir, bind_lan=False)
        wait_until(lambda: committed_with_the_nodes_update(data_dir) >= 2, 180,
                   "two trained rounds", interval=0.5, lab=lab)
        first.kill9()
        before = committed_with_the_nodes_update(data_dir)
        again = lab.start(0, data_dir, tiny_lm_dir, bind_lan=False)
        wait_until(lambda: committed_with_the_nodes_update(data_dir) >= before + 2, 180,
                   "two more trained rounds after the restart", interval=0.5, lab=lab)
        assert any("mDNS: advertising" in json.dumps(e) and "on all" in json.dumps(e)
                   for e in again.events), again.describe(20)
        again.terminate()
        assert again.proc.returncode == 0, again.describe(20)


def wait_for_sync(predicate, timeout: float = 180.0) -> None:
    import asyncio

    asyncio.run(wait_for(predicate, timeout=timeout, interval=0.5))
