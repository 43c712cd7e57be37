"""``chorus-node eval`` (issue 21): metrics against hand-computed values, the label skew of a
Dirichlet split measured, experiment files, a 2-seed matrix end to end, the same numbers on a
rerun, resume after kill -9, and every shipped experiment passing ``--check``."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chorus_p2p.errors import UsageError
from chorus_p2p.evaluation import metrics
from chorus_p2p.evaluation.experiment import Experiment
from chorus_p2p.evaluation.partition import label_skew, split
from chorus_p2p.evaluation.report import mean_ci, summarize
from chorus_p2p.evaluation.tasks import lookup, topics

ROOT = Path(__file__).resolve().parents[1]


def test_accuracy_and_macro_f1_match_hand_computed_values():
    predicted, gold = ["a", "a", "b", "c"], ["a", "b", "b", "c"]
    assert metrics.accuracy(predicted, gold) == 0.75
    # a: tp 1 fp 1 fn 0 -> 2/3; b: tp 1 fp 0 fn 1 -> 2/3; c: 1; d: never seen -> 0
    assert metrics.macro_f1(predicted, gold, ["a", "b", "c"]) == pytest.approx((2 / 3 + 2 / 3
                                                                               + 1) / 3)
    assert metrics.macro_f1(predicted, gold, ["a", "b", "c", "d"]) == pytest.approx(
        (2 / 3 + 2 / 3 + 1) / 4)
    assert metrics.exact_match([" 417", "12"], ["417", "13"]) == 0.5
    mean, half = mean_ci([1.0, 2.0, 3.0])  # sd 1, t(2) = 4.303
    assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3))


def test_choice_scores_are_the_models_own_log_likelihoods(tiny_lm_dir):
    """The batched, padded scorer gives what one unpadded forward per pair gives."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    prompts, choices = ["stir the onions . topic:", "a storm"], ["kitchen", "weather report"]
    got = metrics.choice_logprobs(model, tokenizer, prompts, choices, batch_size=3)
    for i, prompt in enumerate(prompts):
        head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for j, choice in enumerate(choices):
            tail = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([head + tail])).logits[0].log_softmax(-1)
            want = sum(float(logits[len(head) - 1 + k, t]) for k, t in enumerate(tail))
            assert float(got[i, j]) == pytest.approx(want, abs=1e-4)


def test_a_dirichlet_split_skews_labels_as_alpha_says():
    task = topics(0)
    labels = [e.label for e in task.examples]
    groups = [e.group for e in task.examples]

    def skew(how: str, alpha: float = 0.1) -> float:
        parts = split(task.examples, labels, groups, 5, how, seed=3, alpha=alpha)
        assert sorted(map(id, (e for p in parts for e in p))) == sorted(map(id, task.examples))
        assert all(parts)  # nobody empty
        return label_skew([[e.label for e in p] for p in parts])

    assert skew("iid") < 0.05
    assert skew("dirichlet", 100.0) < 0.15
    assert skew("dirichlet", 0.1) > 0.4  # most clients hold one or two of the four topics
    # a client's held-out split has its training labels (the same shares per label)
    train = split(task.examples, labels, groups, 3, "dirichlet", seed=1)
    held = split(task.held_out, [e.label for e in task.held_out],
                 [e.group for e in task.held_out], 3, "dirichlet", seed=1)
    for mine, theirs in zip(train, held):
        assert {e.label for e in theirs} <= {e.label for e in mine}


def test_experiment_files_sweep_every_listed_axis_and_refuse_typos(tmp_path):
    experiment = Experiment.from_table({"clients": [2, 3], "partition": ["iid", "dirichlet"],
                                        "seeds": [0, 1, 2], "strategies": ["local", "fedex"]})
    assert len(experiment.runs()) == 2 * 2 * 3 * 2
    assert len({r.run_id for r in experiment.runs()}) == 24
    with pytest.raises(UsageError, match="unknown setting 'client'"):
        Experiment.from_table({"client": 3})
    with pytest.raises(UsageError, match="strategy 'fedprox'"):
        Experiment.from_table({"strategies": ["fedprox"]})
    bad = tmp_path / "bad.toml"
    bad.write_text("[experiment]\nclients = 'three'\n")
    with pytest.raises(UsageError, match="clients"):
        Experiment.load(bad)


def test_the_built_in_tasks_are_what_they_say():
    task = topics(0)
    assert task.kind == "classification" and len(task.choices) == 4
    assert all(e.answer in task.choices and e.text.endswith(e.answer) for e in task.examples)
    short = lookup(0)
    assert short.kind == "short_answer"
    # held-out questions use a phrasing no training example uses
    phrasings = {e.prompt.split()[0] for e in short.examples}
    assert not {e.prompt.split()[0] for e in short.held_out} & phrasings


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chorus_p2p.cli.main", *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kwargs)


def _mini(tmp_path: Path, model: Path) -> Path:
    path = tmp_path / "mini.toml"
    path.write_text(f"""[experiment]
name = "mini"
task = "topics"
model = "{model}"
clients = 2
partition = "dirichlet"
rounds = 1
local_steps = 4
target_modules = ["q_proj", "v_proj"]
eval_examples = 40
strategies = ["local", "centralized", "fedavg", "fedex"]
seeds = [0, 1]
""")
    return path


def test_a_two_seed_matrix_runs_end_to_end_resumes_after_kill9_and_reproduces(tmp_path,
                                                                             tiny_lm_dir):
    config, out = _mini(tmp_path, tiny_lm_dir), tmp_path / "results"
    # kill -9 as soon as the first run's record is on disk: the rerun keeps it, skips it
    proc = subprocess.Popen([sys.executable, "-m", "chorus_p2p.cli.main", "eval", str(config),
                             "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    while not list((out / "runs").glob("*.json")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    first = {p.name: p.read_text() for p in (out / "runs").glob("*.json")}
    assert first and not list((out / "runs").glob("*.partial"))
    done = _cli("eval", str(config), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done before, skipped") == len(first)
    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert len(records) == 8
    for name, text in first.items():  # kept as it was
        assert (out / "runs" / name).read_text() == text
    summary = json.loads((out / "summary.json").read_text())
    entries = summary[0]["strategies"]
    assert set(entries) == {"local", "centralized", "fedavg", "fedex"}
    assert entries["fedex"]["vs_fedavg"]["pairs"] == 2
    assert "| centralized |" in (out / "summary.md").read_text()
    # what a client sends and fetches per round: fedex fetches D besides the adapter, the
    # bounds send nothing
    down = {k: entries[k]["bytes_down_per_client_round"] for k in entries}
    assert down["fedex"] > down["fedavg"] > 0 and down["local"] == down["centralized"] == 0
    assert entries["fedavg"]["bytes_per_client_round"] > 0
    # the same seed on the same machine: the same numbers to the last digit (a federated run
    # and a local one again, in this process, against what the CLI wrote)
    from chorus_p2p.evaluation.runner import execute

    for run in [r for r in Experiment.load(config).runs() if r.seed == 1
                and r.strategy in ("fedex", "local")]:
        twin = execute(run, tmp_path / "again", tmp_path / "models", log=lambda m: None)
        record = json.loads((out / "runs" / f"{run.run_id}.json").read_text())
        assert twin["final"] == record["final"] and twin["curve"] == record["curve"]
    # the reports re-render from the JSONs alone, the PNG curves too (plots extra)
    (out / "summary.md").unlink()
    (out / "curves-1.png").unlink()
    assert _cli("eval", str(config), "--out", str(out), "--report").returncode == 0
    assert (out / "summary.md").exists()
    assert (out / "curves-1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # what the curves draw: per strategy and round, the mean and range over the seeds
    from chorus_p2p.evaluation.plots import curves

    drawn = curves(records, summary[0]["setting"], "accuracy")
    for strategy in ("fedex", "local"):
        mine = [r for r in records if r["run"]["strategy"] == strategy]
        for number, mean, low, high in drawn[strategy]:
            values = [next(p["accuracy"] for p in r["curve"] if p["round"] == number)
                      for r in mine]
            assert len(values) == 2 and low == min(values) and high == max(values)
            assert mean == pytest.approx(sum(values) / 2)


def test_paired_differences_count_wins_per_seed():
    def record(strategy: str, seed: int, value: float) -> dict:
        final = {"global": {"mean": {"accuracy": value, "loss": 1.0},
                            "worst": {"accuracy": value, "loss": 1.0}},
                 "personal": {"mean": {"accuracy": value, "loss": 1.0},
                              "worst": {"accuracy": value, "loss": 1.0}}}
        return {"run": {"task": "t", "clients": 2, "strategy": strategy, "seed": seed},
                "task_kind": "classification", "final": final, "label_skew": 0.5,
                "cost": {"bytes_per_client_round": 10, "seconds_per_round": 1.0}}
    records = [record("fedavg", s, v) for s, v in enumerate((0.5, 0.6, 0.7))] + \
        [record("fedex", s, v) for s, v in enumerate((0.6, 0.6, 0.9))]
    entry = summarize(records)[0]["strategies"]["fedex"]["vs_fedavg"]
    assert entry["wins"] == 2 and entry["pairs"] == 3  # a tie is not a win
    assert entry["diff"][0] == pytest.approx(0.1)


@pytest.mark.parametrize("config", sorted((ROOT / "benchmarks").glob("*.toml")) +
                         sorted((ROOT / "examples" / "eval").glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_shipped_experiment_passes_check(config):
    done = _cli("eval", str(config), "--check")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ok: the experiment and its data are ready" in done.stdout


def test_a_local_dp_run_noises_every_release_and_reports_its_epsilon(tmp_path, tiny_lm_dir):
    """``dp_noise > 0``: each client's release goes through privatize_file (the node's own
    mechanism) before aggregation; the record states the epsilon the accountant gives for
    that many releases, and the bounds (which send nothing) carry none."""
    from chorus_p2p.evaluation.experiment import Experiment
    from chorus_p2p.evaluation.runner import execute
    from chorus_p2p.train.privacy import DPConfig, epsilon_after

    experiment = Experiment.from_table({
        "model": str(tiny_lm_dir), "clients": 2, "rounds": 2, "local_steps": 2,
        "target_modules": ["q_proj", "v_proj"], "dp_noise": 1.0, "dp_clip": 0.05,
        "eval_examples": 40,
        "strategies": ["fedex", "local"], "seeds": [0]})
    fedex, local = experiment.runs()
    record = execute(fedex, tmp_path, tmp_path / "models", log=lambda m: None)
    assert record["dp"]["epsilon"] == pytest.approx(
        epsilon_after(2, DPConfig(1.0, noise_multiplier=1.0)), rel=1e-6)
    assert execute(local, tmp_path, tmp_path / "models", log=lambda m: None)["dp"] is None


def test_a_dp_sgd_run_trains_every_client_privately_and_prices_each_record(tmp_path,
                                                                          tiny_lm_dir):
    """``dp_mechanism = "dp-sgd"``: every client trains by DP-SGD (its own sampling rate, from
    its own record count), and the record states the largest epsilon any client spent."""
    from chorus_p2p.evaluation.experiment import Experiment
    from chorus_p2p.evaluation.runner import execute
    from chorus_p2p.train.dp_sgd import plan_release
    from chorus_p2p.federation.accounting import epsilon_of_releases

    with pytest.raises(UsageError, match="dp_mechanism 'dpsgd'"):
        Experiment.from_table({"dp_mechanism": "dpsgd"})
    experiment = Experiment.from_table({
        "model": str(tiny_lm_dir), "clients": 2, "rounds": 2, "local_steps": 3,
        "target_modules": ["q_proj", "v_proj"], "dp_noise": 1.0, "dp_clip": 1.0,
        "dp_mechanism": "dp-sgd", "eval_examples": 40, "strategies": ["fedex"], "seeds": [0]})
    record = execute(experiment.runs()[0], tmp_path, tmp_path / "models", log=lambda m: None)
    plans = [plan_release(n, 8, 3, 1.0, 1.0).to_json() for n in record["examples_per_client"]]
    assert record["dp"]["mechanism"] == "dp-sgd"
    assert record["dp"]["epsilon"] == pytest.approx(
        max(epsilon_of_releases([plan, plan], 1e-5) for plan in plans), rel=1e-6)
