"""Built-in offline tasks: generated, not shipped, so they cost no download and no disk.

``topics`` is a classification task a tiny model learns from scratch in seconds: a note made of
words drawn mostly from its topic's vocabulary (and some from the others', so it is not
trivial), then ``topic:`` and the label word. Scored by the log-likelihood of each label's word
after the prompt (no generation). Under a label-skewed split each client sees one or two topics,
so a client alone cannot classify the others: federating has something to win.

``lookup`` is a short-answer task with exact match: ``code of <name> is <code>`` for a fixed
table, asked in several phrasings. Clients hold different names under a skewed split, so only a
federated (or centralized) model knows the whole table.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

TOPIC_WORDS = {
    "weather": ["rain", "cloud", "storm", "wind", "sunny", "fog", "thunder", "snow", "humid",
                "breeze", "forecast", "drizzle"],
    "kitchen": ["onion", "flour", "oven", "stir", "bake", "salt", "garlic", "simmer", "dough",
                "butter", "pan", "spoon"],
    "garden": ["seed", "soil", "prune", "bloom", "weed", "compost", "rose", "hedge", "water",
               "shade", "mulch", "sprout"],
    "workshop": ["drill", "screw", "plank", "sand", "clamp", "chisel", "glue", "saw", "bolt",
                 "lathe", "bench", "varnish"],
}
FILLER = ["the", "a", "with", "and", "after", "before", "some", "today", "then", "more", "near",
          "under", "we", "it", "was", "very"]
NAMES = ["amber", "basil", "cedar", "delta", "ember", "fjord", "glade", "haven", "iris", "juniper",
         "kestrel", "lumen", "maple", "nova", "onyx", "pebble", "quill", "raven", "sable",
         "tundra", "umber", "vale", "willow", "yarrow"]
PHRASES = ["code of {name} is", "the code for {name} is", "{name} has code", "look up {name}:"]


@dataclass(frozen=True)
class Example:
    """One example: ``prompt`` + ``" " + answer`` is the text trained on; ``label`` is what
    partitions skew over (a topic, or a name's group)."""

    prompt: str
    answer: str
    label: str
    group: str = ""

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}"


@dataclass
class Task:
    name: str
    kind: str  # "classification" (choose among ``choices``) or "short_answer" (exact match)
    examples: list[Example]
    held_out: list[Example]
    choices: list[str] = field(default_factory=list)


def topics(seed: int, train: int = 1600, held_out: int = 240, noise: float = 0.25) -> Task:
    """Four topics; each note has 4-6 content words, each from another topic with
    probability ``noise``."""
    rng = random.Random(f"topics-{seed}")
    labels = sorted(TOPIC_WORDS)

    def note(label: str) -> Example:
        words = []
        for _ in range(rng.randint(4, 6)):
            source = rng.choice(labels) if rng.random() < noise else label
            words.append(rng.choice(TOPIC_WORDS[source]))
            if rng.random() < 0.5:
                words.append(rng.choice(FILLER))
        return Example(f"note: {' '.join(words)} . topic:", label, label)

    def batch(n: int) -> list[Example]:
        return [note(labels[i % len(labels)]) for i in range(n)]

    return Task("topics", "classification", batch(train), batch(held_out), labels)


def lookup(seed: int, train: int = 1600, held_out: int = 240) -> Task:
    """A table of names -> 3-digit codes; training uses three phrasings, held-out questions the
    fourth, so exact match needs the fact, not the sentence. A name's group (its first
    letter's half of the alphabet, four groups) is what a skewed split skews over."""
    rng = random.Random(f"lookup-{seed}")
    table = {name: f"{rng.randint(100, 999)}" for name in NAMES}

    def ask(name: str, phrases: list[str]) -> Example:
        group = f"g{NAMES.index(name) % 4}"
        return Example(rng.choice(phrases).format(name=name), table[name], group)

    return Task("lookup", "short_answer",
                [ask(NAMES[i % len(NAMES)], PHRASES[:3]) for i in range(train)],
                [ask(NAMES[i % len(NAMES)], PHRASES[3:]) for i in range(held_out)])


BUILT_IN = {"topics": topics, "lookup": lookup}
