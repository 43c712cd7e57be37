"""Shared fixtures: a tiny Llama on disk and PEFT client adapters for it, built offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from chorus_p2p.tiny import make_client_adapter, quiet_transformers, save_tiny_model  # noqa: E402

quiet_transformers()


@pytest.fixture(autouse=True)
def _node_logging_restored():
    """A test that runs `up` in this process configures the node's logging (its own handler,
    no propagation): put it back, so a later test's caplog still sees the node's records."""
    import logging

    logger = logging.getLogger("chorus_p2p")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "base", seed=0)


@pytest.fixture(scope="session")
def spec(tiny_base):
    """The federation every node test trains: the tiny model at nodeutil's rank and targets."""
    from chorus_p2p.federation.spec import FederationSpec
    from nodeutil import ALPHA, RANK, TARGETS

    return FederationSpec.build(str(tiny_base), RANK, ALPHA, TARGETS)


@pytest.fixture(scope="session")
def client_adapters(tiny_base, tmp_path_factory) -> list[Path]:
    """Three clients with different ranks, alphas and one with rsLoRA: the heterogeneous case."""
    root = tmp_path_factory.mktemp("clients")
    specs = [dict(rank=4, alpha=8.0), dict(rank=8, alpha=16.0, use_rslora=True),
             dict(rank=2, alpha=32.0, rank_pattern={"v_proj": 6})]
    return [make_client_adapter(tiny_base, root / f"client{i}", seed=10 + i, **spec)
            for i, spec in enumerate(specs)]


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """The tiny Llama with its own tokenizer (what training needs), built from the shipped text."""
    from chorus_p2p.train.tiny_lm import build_tiny_lm

    root = Path(__file__).resolve().parents[1] / "examples" / "data"
    shards = [root / f"{n}.jsonl" for n in ("kitchen", "weather", "workshop")]
    return build_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny-llama", shards, pretrain_steps=5,
                         log=lambda m: None)


@pytest.fixture
async def federation(tmp_path, tiny_base):
    """Make ``nodeutil.Federation``s of in-process nodes on loopback; all stopped at the end."""
    from nodeutil import Federation

    feds = []

    def make(n, **overrides):
        fed = Federation(tmp_path, tiny_base, n, **overrides)
        feds.append(fed)
        return fed

    yield make
    for fed in feds:
        await fed.close()


@pytest.fixture
def processes(tmp_path, tiny_base):
    """Make ``nodeutil.Processes`` federations of real node processes; all killed at the end."""
    from nodeutil import Processes

    made = []

    def make(n, extra=None):
        made.append(Processes(tmp_path, tiny_base, n, extra))
        return made[-1]
    yield make
    for federation in made:
        federation.close()
