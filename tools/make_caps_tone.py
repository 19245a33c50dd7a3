"""Write examples/caps-tone/{train,test}.jsonl: general questions answered in capital letters, a "tone" adapter's
data to stack with the home-intents "domain" adapter.

The answers are the base model's own (greedy, through nomoat's runtime, cut at the end of a sentence) in upper
case, so the adapter learns the tone and nothing else. The test file asks about topics the training file never
names. Needs an exported model folder of the base (default: models/smollm2-135m).

    .venv/bin/python tools/make_caps_tone.py [MODEL_FOLDER]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["the moon", "rain", "a volcano", "coffee", "bread", "a bicycle", "the ocean", "a library", "music",
          "a rainbow", "snow", "bees", "a computer", "the internet", "chess", "a forest", "the sun", "wind",
          "a river", "electricity", "a telescope", "photosynthesis", "a bridge", "gravity", "a map", "cheese",
          "a garden", "a clock", "a camera", "the heart", "an airplane", "a battery", "salt", "a desert",
          "honey", "a compass", "a piano", "thunder", "a tree", "glass", "an island", "a museum", "yoga",
          "a rocket", "soap", "the brain", "a castle", "tea", "a penguin", "clouds", "a whale", "paper",
          "a magnet", "football", "a lighthouse", "rice", "an earthquake", "a violin", "the alphabet", "a mountain"]
QUESTIONS = ["What is {t}?", "Tell me about {t}.", "Why is {t} interesting?", "Describe {t} in a few words."]


def first_sentences(text: str, limit: int = 160) -> str:
    """Up to the last sentence end within `limit` characters (the whole text if it has none)."""
    text = " ".join(text.split())
    cut = max((i for i, c in enumerate(text[:limit]) if c in ".!?"), default=-1)
    return text[: cut + 1] if cut > 20 else text[:limit]


def main() -> None:
    from nomoat.edge.generate import Generator

    gen = Generator(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "models/smollm2-135m")
    rng = random.Random(0)
    topics = TOPICS[:]
    rng.shuffle(topics)
    held = set(topics[:10])  # topics the training data never names
    train, test = [], []
    for t in topics:
        for q in QUESTIONS:
            question = q.format(t=t)
            msgs = [{"role": "user", "content": question}]
            ids = gen.tokenizer.encode(gen.tokenizer.chat(msgs), add_special_tokens=False)
            text = gen.tokenizer.decode(gen.generate(ids, max_tokens=48).tokens)
            ex = {"messages": [*msgs, {"role": "assistant", "content": first_sentences(text).upper()}]}
            (test if t in held else train).append(ex)
    rng.shuffle(train)
    folder = ROOT / "examples" / "caps-tone"
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"wrote {folder / name}.jsonl: {len(rows)} examples")


if __name__ == "__main__":
    main()
