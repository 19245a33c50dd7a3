"""Two adapters trained apart by `nomoat tune`, active together on the device runtime: a domain (home-intents: house
JSON) and a tone (caps-tone: answers in capitals). Each held-out set is answered greedily with no adapter, each
adapter alone, and both stacked; the table gives the share of answers with each behaviour.

    nomoat tune GGUF --data examples/home-intents/train.jsonl -o /tmp/home --for models/smollm2-135m-slots16
    nomoat tune GGUF --data examples/caps-tone/train.jsonl -o /tmp/caps --for models/smollm2-135m-slots16
    .venv/bin/python tools/tune_stacking.py /tmp/home /tmp/caps

Adapters that stack: train each with the other's prompts preserved (`--preserve examples/caps-tone/train.jsonl`
for home, `--preserve examples/home-intents/train.jsonl` for caps), then run this on those two folders.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def house_json(answer: str, wanted: str) -> bool:
    try:
        return json.loads(answer.strip()) == json.loads(wanted)
    except ValueError:
        return False


def capitals(answer: str, wanted: str) -> bool:
    letters = [c for c in answer if c.isalpha()]
    return len(letters) >= 10 and sum(c.isupper() for c in letters) >= 0.9 * len(letters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("home", type=Path, help="PEFT folder trained on examples/home-intents")
    ap.add_argument("caps", type=Path, help="PEFT folder trained on examples/caps-tone")
    ap.add_argument("--model", type=Path, default=ROOT / "models/smollm2-135m-slots16")
    ap.add_argument("--max-tokens", type=int, default=40)
    args = ap.parse_args()

    from nomoat.edge.generate import Generator
    from nomoat.export.packing import pack_adapter

    gen = Generator(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="nomoat-stack-"))
    for name, folder in (("home", args.home), ("caps", args.caps)):
        pack_adapter(folder, args.model, tmp / f"{name}.onnx_adapter", name=name)
        gen.load_adapter(tmp / f"{name}.onnx_adapter", name)
    sets = {"home-intents: house JSON, exact": (ROOT / "examples/home-intents/test.jsonl", house_json),
            "caps-tone: answer in capitals": (ROOT / "examples/caps-tone/test.jsonl", capitals)}
    selections = {"no adapter": (), "home": (("home", 1.0),), "caps": (("caps", 1.0),),
                  "home + caps": (("home", 1.0), ("caps", 1.0))}
    rows: dict[str, dict[str, float]] = {}
    for label, (path, check) in sets.items():
        tests = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for sel_name, sel in selections.items():
            hits = 0
            for ex in tests:
                ids = gen.tokenizer.encode(gen.tokenizer.chat(ex["messages"][:-1]), add_special_tokens=False)
                text = gen.tokenizer.decode(gen.generate(ids, max_tokens=args.max_tokens, adapters=sel).tokens)
                hits += check(text, ex["messages"][-1]["content"])
            rows.setdefault(label, {})[sel_name] = hits / len(tests)
            print(f"{label} ({len(tests)}), {sel_name}: {hits / len(tests):.1%}", flush=True)
        sample = tests[0]["messages"][:-1]
        ids = gen.tokenizer.encode(gen.tokenizer.chat(sample), add_special_tokens=False)
        both = gen.tokenizer.decode(gen.generate(ids, max_tokens=args.max_tokens,
                                                 adapters=selections["home + caps"]).tokens)
        print(f"  e.g. {sample[-1]['content']!r} with home + caps: {both!r}")
    print(f"\n| held-out set | {' | '.join(selections)} |\n|---|{'---|' * len(selections)}")
    for label, r in rows.items():
        print(f"| {label} | {' | '.join(f'{r[s]:.0%}' for s in selections)} |")


if __name__ == "__main__":
    main()
