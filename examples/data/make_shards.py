"""Regenerate the demo's non-IID text shards (self-written templates, public domain).

Three shards with clearly different distributions: kitchen notes, sea-area weather forecasts and
workshop maintenance logs. Deterministic: the committed *.jsonl files are this script's output.

    python examples/data/make_shards.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
COUNT = 400


def kitchen(rng: random.Random) -> str:
    verbs = ["Whisk", "Fold", "Simmer", "Roast", "Knead", "Season", "Chop", "Stir", "Bake", "Toast"]
    things = ["the onions", "two eggs", "the dough", "a cup of rice", "the carrots", "fresh basil",
              "the lentils", "a knob of butter", "the garlic", "three tomatoes", "the flour"]
    how = ["until golden", "for ten minutes", "with a pinch of salt", "over a low heat",
           "until soft", "in a warm oven", "with a wooden spoon", "until it smells nutty"]
    after = ["Serve with crusty bread.", "Let it rest before slicing.", "Taste and adjust the salt.",
             "Keep the lid on so it stays moist.", "Garnish with parsley and lemon."]
    steps = [f"{rng.choice(verbs)} {rng.choice(things)} {rng.choice(how)}." for _ in range(rng.randint(2, 3))]
    return " ".join(steps + [rng.choice(after)])


def weather(rng: random.Random) -> str:
    areas = ["Dogger", "Fisher", "German Bight", "Humber", "Thames", "Dover", "Wight", "Portland",
             "Plymouth", "Biscay", "Irish Sea", "Shannon", "Rockall", "Malin", "Hebrides"]
    winds = ["southwesterly", "westerly", "northerly", "easterly", "northwesterly", "variable"]
    sea = ["moderate", "rough", "slight", "very rough", "moderate or rough"]
    weather_words = ["rain later", "showers", "fair", "fog patches", "squally showers", "drizzle"]
    vis = ["good", "moderate", "good, occasionally poor", "poor"]
    a, b = rng.sample(areas, 2)
    lo = rng.randint(3, 6)
    return (f"{a}, {b}. {rng.choice(winds).capitalize()} {lo} to {lo + rng.randint(1, 2)}, "
            f"occasionally {lo + 2} later. {rng.choice(sea).capitalize()}. "
            f"{rng.choice(weather_words).capitalize()}. {rng.choice(vis).capitalize()}.")


def workshop(rng: random.Random) -> str:
    machines = ["lathe 3", "the band saw", "press 2", "the milling machine", "compressor A",
                "the drill press", "conveyor 4", "the spot welder", "pump 7"]
    actions = ["Replaced the drive belt on", "Greased the bearings of", "Calibrated",
               "Tightened the guard on", "Cleaned the coolant tank of", "Checked the wiring of",
               "Swapped the worn chuck on", "Logged a vibration fault on"]
    details = ["torque set to {n} Nm", "runtime {n} hours since service", "temperature {n} C at idle",
               "spindle at {n} rpm", "pressure {n} bar", "{n} parts made since last check"]
    status = ["Machine back in service.", "Awaiting spare part.", "Test run passed.",
              "Flag for review on Monday.", "No further action."]
    detail = rng.choice(details).format(n=rng.randint(5, 950))
    return f"{rng.choice(actions)} {rng.choice(machines)}; {detail}. {rng.choice(status)}"


def main() -> None:
    for name, make in (("kitchen", kitchen), ("weather", weather), ("workshop", workshop)):
        rng = random.Random(f"chorus-{name}")
        with open(HERE / f"{name}.jsonl", "w") as out:
            for _ in range(COUNT):
                out.write(json.dumps({"text": make(rng)}) + "\n")
    # A small instruction-format file, to show (and test) the instruction template.
    rng = random.Random("chorus-instructions")
    with open(HERE / "instructions.jsonl", "w") as out:
        for _ in range(60):
            area = rng.choice(["Dogger", "Thames", "Biscay", "Malin"])
            out.write(json.dumps({"instruction": "Give the shipping forecast for this area.",
                                  "input": area, "output": weather(rng)}) + "\n")


if __name__ == "__main__":
    main()
