"""Write examples/home-intents/{train,test}.jsonl: home-automation requests answered in a house JSON format.

The behaviour is checkable: an answer is right when it is one JSON object equal to the wanted one, and "in the
house format" when it parses as a JSON object whose "intent" is one of ours. The test file holds request
phrasings and rooms paired in ways the training file never shows, so it measures the format learned, not
memorised sentences. Deterministic: running it again writes the same files.

    python tools/make_home_intents.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOMS = ["kitchen", "living room", "bedroom", "bathroom", "office", "garage", "hallway", "dining room",
         "kids' room", "basement", "attic", "guest room"]
DOORS = ["front door", "back door", "garage door", "patio door"]

PHRASES: dict[str, list[str]] = {
    "light_on": ["Turn on the lights in the {room}.", "Switch the {room} lights on, please.",
                 "It's too dark in the {room}.", "Could you light up the {room}?", "{Room} lights on.",
                 "I need some light in the {room}.", "Please turn the {room} light on."],
    "light_off": ["Turn off the lights in the {room}.", "Switch the {room} lights off.",
                  "Nobody is in the {room}, kill the lights.", "Lights off in the {room}, please.",
                  "Can you turn the {room} light off?", "{Room}: lights out."],
    "set_brightness": ["Dim the {room} lights to {value} percent.", "Set the {room} brightness to {value}%.",
                       "Make the {room} lights {value} percent bright.", "{Room} lights at {value}%, please.",
                       "Could you put the {room} lights at {value} percent?"],
    "set_temperature": ["Set the {room} to {value} degrees.", "Make it {value} degrees in the {room}.",
                        "I'd like the {room} at {value} °C.", "Heat the {room} to {value} degrees, please.",
                        "Change the {room} thermostat to {value}."],
    "blinds_open": ["Open the blinds in the {room}.", "Raise the {room} blinds.", "Let some sun into the {room}.",
                    "Pull up the {room} shades, please."],
    "blinds_close": ["Close the blinds in the {room}.", "Lower the {room} blinds.",
                     "The sun is too bright in the {room}, shut the blinds.", "Draw the {room} shades."],
    "lock": ["Lock the {room}.", "Is the {room} locked? Lock it.", "Please secure the {room}.",
             "Make sure the {room} is locked."],
    "unlock": ["Unlock the {room}.", "Open the lock on the {room}, please.", "Let me in, unlock the {room}.",
               "Release the {room} lock."],
}
VALUES = {"set_brightness": list(range(10, 101, 10)), "set_temperature": list(range(16, 27))}


def answer(intent: str, room: str, value: int | None) -> str:
    out: dict = {"intent": intent, "room": room}
    if value is not None:
        out["value"] = value
    return json.dumps(out)


def examples(rng: random.Random) -> tuple[list[dict], list[dict]]:
    train, test = [], []
    for intent, phrases in PHRASES.items():
        rooms = DOORS if intent in ("lock", "unlock") else ROOMS
        pairs = [(p, r) for p in phrases for r in rooms]
        rng.shuffle(pairs)
        held = max(2, len(pairs) // 6)  # pairs of phrasing and room the training data never shows
        for i, (phrase, room) in enumerate(pairs):
            value = rng.choice(VALUES[intent]) if intent in VALUES else None
            text = phrase.format(room=room, Room=room[0].upper() + room[1:], value=value)
            ex = {"messages": [{"role": "user", "content": text},
                               {"role": "assistant", "content": answer(intent, room, value)}]}
            (test if i < held else train).append(ex)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def main() -> None:
    folder = Path(__file__).resolve().parent.parent / "examples" / "home-intents"
    folder.mkdir(parents=True, exist_ok=True)
    train, test = examples(random.Random(0))
    for name, rows in (("train", train), ("test", test)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"wrote {folder / name}.jsonl: {len(rows)} examples")


if __name__ == "__main__":
    main()
