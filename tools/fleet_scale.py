#!/usr/bin/env python3
"""Many devices on bridged sites: N real `nomoat serve` daemons (a small random LLaMA with LoRA slots), spread
over site brokers bridged to a central one (tools/bridged_sites.py, the shipped configs). For each N:

- start-up: time until every device's retained status is on the central broker;
- push: `fleet push --activate` of a signed adapter from the central broker, time until each device reports
  `activated` (first, median, last);
- a cut-off site: the next version pushed while one site's link is down, how long its devices take to catch up
  once the link is back;
- pool: 2N prompts published at once to the fleet pool on the central broker; each must be answered exactly once
  (none lost, none twice), and how they spread over sites and devices;
- memory: RSS of each broker and of the daemons.

    .venv/bin/python tools/fleet_scale.py --devices 10 20 50

Prints a JSON line per N and two Markdown tables at the end (docs/deployment.md has them). Every daemon runs one
thread (`threads = 1`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))

import bridged_sites as sites  # noqa: E402


def build_model(folder: Path) -> tuple[Path, Path, Path, str]:
    """A small random LLaMA (8 layers of 256, the tests' tokenizer) exported int4 with rank-64 LoRA slots, a
    random adapter for it (3.7 MB, the size of a rank-16 SmolLM2 adapter: 29 chunks of 128 KiB) and a signing
    key: (model, adapter file, key, public key). Made once, in `folder`."""
    from nomoat.edge.fleet import generate_key, load_key, public_hex

    model, adapter, key = folder / "model", folder / "a1.onnx_adapter", folder / "fleet.key"
    if not (folder / "done").exists():
        import torch
        from conftest import export, make_adapter, make_tokenizer
        from nomoat.export.packing import pack_adapter
        from transformers import LlamaConfig, LlamaForCausalLM

        llama = folder / "llama"
        llama.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=make_tokenizer(llama), hidden_size=256, intermediate_size=512,
                             num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
        LlamaForCausalLM(config).save_pretrained(llama)
        export(llama, model, lora_rank=64)
        pack_adapter(make_adapter(llama, folder / "peft", seed=1, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                                  rank=64), model, adapter)
        generate_key(key)
        (folder / "done").write_text("")
    return model, adapter, key, public_hex(load_key(key))


def central_client(topo, filters: list[str], inbox: list):
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.username_pw_set("operator", sites.PASSWORD)
    c.on_message = lambda cl, u, m: inbox.append((time.perf_counter(), m.topic, m.payload))
    c.connect("127.0.0.1", topo.central.port)
    c.loop_start()
    c.subscribe([(f, 1) for f in filters])
    time.sleep(0.5)
    return c


def replies(seen: list) -> dict[str, list[tuple[float, str, dict]]]:
    """Request id -> each final reply received for it: (arrival time, the answering device, the message)."""
    finals: dict[str, list[tuple[float, str, dict]]] = {}
    for at, topic, payload in list(seen):
        if "/reply/" in topic:
            message = json.loads(payload)
            finals.setdefault(message["id"], []).append((at, topic.split("/")[2], message))
    return finals


def run(n: int, n_sites: int, model: Path, adapter: Path, key: Path, pub: str, prompts: int) -> dict:
    from nomoat.edge.adapters import read_meta
    from nomoat.edge.client import publish_all, push_and_watch
    from nomoat.edge.fleet import build_push, load_key

    names = [f"site-{chr(ord('a') + i)}" for i in range(n_sites)]
    devices = {s: [f"dev-{s[-1]}{j + 1}" for j in range(len(range(k, n, n_sites)))] for k, s in enumerate(names)}
    topo = sites.Topology(n_sites, devices)
    procs: list[subprocess.Popen] = []
    result: dict = {"devices": n, "sites": n_sites}
    try:
        topo.wait_bridges()
        profile = topo.folder / "profile.toml"
        profile.write_text("threads = 1\nqueue_size = 8\nmax_new_tokens = 64\n")
        seen: list = []
        client = central_client(topo, ["nomoat/home/+/status", "nomoat/home/+/reply/#"], seen)
        start = time.perf_counter()
        for site, names_here in devices.items():
            for name in names_here:
                config = topo.device_config(site, name)
                store = topo.folder / f"store-{name}"
                config.write_text(f'trusted_keys = ["{pub}"]\nadapter_store = "{store}"\n' + config.read_text())
                log = open(topo.folder / f"{name}.log", "w")  # noqa: SIM115 (the daemon's, until it stops)
                procs.append(subprocess.Popen([sys.executable, "-m", "nomoat", "serve", str(model), "--config",
                                               str(config), "--profile", str(profile)], stdout=log,
                                              stderr=subprocess.STDOUT))
        online: set[str] = set()
        while len(online) < n and time.perf_counter() - start < 60 + 5 * n:
            for _, topic, payload in list(seen):
                if topic.endswith("/status") and payload and json.loads(payload).get("state") == "online":
                    online.add(topic.split("/")[2])
            time.sleep(0.2)
        result["startup_s"] = round(time.perf_counter() - start, 1)
        result["online"] = len(online)
        time.sleep(2)  # let start-up settle before measuring

        # push: signed, chunked (the default 128 KiB chunks), retained on the central broker
        manifest, chunks = build_push(adapter, "a1", 1, read_meta(adapter)["base_model_hash"], load_key(key),
                                      128 * 1024, True)
        base = "nomoat/home/adapters/a1"
        messages = [(f"{base}/1/{i}", c) for i, c in enumerate(chunks)] + [(base, json.dumps(manifest).encode())]
        brokers = {"central": topo.central, **topo.sites}
        cpu = {k: sites.cpu_s(b.proc.pid) for k, b in brokers.items()}
        events = push_and_watch(topo.operator(), messages, "a1", 1, n, "activated", timeout=60 + 2 * n)
        times = [e["seconds"] for e in events if e["event"] == "activated"]
        result["push"] = {"broker_cpu_s": {k: round(sites.cpu_s(b.proc.pid) - cpu[k], 2) for k, b in brokers.items()},
                          "adapter_bytes": manifest["size"], "chunks": len(chunks), "activated": len(times),
                          "rejected": sum(e["event"] == "rejected" for e in events),
                          "first_s": min(times, default=None),
                          "median_s": round(statistics.median(times), 3) if times else None,
                          "last_s": max(times, default=None)}

        # the next version while the last site's link is down: the other sites activate it, then the cut site
        # catches up when its bridge reconnects (retained manifest and chunks come again at the subscription)
        cut = names[-1]
        topo.relays[cut].cut()
        manifest, chunks = build_push(adapter, "a1", 2, read_meta(adapter)["base_model_hash"], load_key(key),
                                      128 * 1024, True)
        messages = [(f"{base}/2/{i}", c) for i, c in enumerate(chunks)] + [(base, json.dumps(manifest).encode())]
        reachable = n - len(devices[cut])
        events = push_and_watch(topo.operator(), messages, "a1", 2, reachable, "activated", timeout=60 + 2 * n)
        watch: list = []
        watcher = central_client(topo, ["nomoat/home/+/events"], watch)
        restored = time.perf_counter()
        topo.relays[cut].restore()
        caught_up: set[str] = set()
        while len(caught_up) < len(devices[cut]) and time.perf_counter() - restored < 60 + 2 * n:
            for _, _, payload in list(watch):
                e = json.loads(payload)
                if e.get("event") == "activated" and e.get("version") == 2 and e.get("device") in devices[cut]:
                    caught_up.add(e["device"])
            time.sleep(0.1)
        catch_up_s = round(time.perf_counter() - restored, 2)
        topo.wait_bridges()  # (the pool's bridge too, before the pool's prompts)
        result["cut_site"] = {"site": cut, "others_activated": sum(e["event"] == "activated" for e in events),
                              "others_last_s": max((e["seconds"] for e in events), default=None),
                              "cut_site_devices": len(devices[cut]), "caught_up": len(caught_up),
                              "caught_up_after_link_s": catch_up_s}
        watcher.disconnect()
        watcher.loop_stop()

        # pool: `prompts` per device at once, no Response Topic (the fallback topic names the device)
        ids = [f"pool-{uuid.uuid4().hex[:8]}-{i}" for i in range(prompts * n)]
        seen.clear()
        cpu = {k: sites.cpu_s(b.proc.pid) for k, b in brokers.items()}
        sent = time.perf_counter()
        publish_all(topo.operator(), [("nomoat/home/prompt", json.dumps(
            {"id": rid, "prompt": "The capital", "max_tokens": 4, "stream": False}).encode()) for rid in ids],
            retain=False)
        deadline = sent + 60 + n
        while len(replies(seen)) < len(ids) and time.perf_counter() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # duplicates would arrive now
        finals = replies(seen)
        answered = [rid for rid in ids if rid in finals]
        by_device: dict[str, int] = {}
        for rid in answered:
            by_device[finals[rid][0][1]] = by_device.get(finals[rid][0][1], 0) + 1
        result["pool"] = {
            "broker_cpu_s": {k: round(sites.cpu_s(b.proc.pid) - cpu[k], 2) for k, b in brokers.items()},
            "prompts": len(ids), "answered": len(answered), "lost": len(ids) - len(answered),
            "twice": sum(len(finals[r]) > 1 for r in answered),
            "errors": sum("error" in finals[r][0][2] for r in answered),
            "all_answered_s": round(max(f[0][0] for f in finals.values()) - sent, 2) if finals else None,
            "devices_used": len(by_device),
            "per_site": {s: sum(c for d, c in by_device.items() if d in devices[s]) for s in devices},
        }
        daemons = [sites.rss_mib(p.pid) for p in procs if p.poll() is None]
        result["memory_mib"] = {"central": round(topo.central.rss_mib(), 1),
                                **{s: round(b.rss_mib(), 1) for s, b in topo.sites.items()},
                                "daemon_mean": round(statistics.mean(daemons), 1) if daemons else None,
                                "daemon_max": round(max(daemons), 1) if daemons else None,
                                "daemons_total": round(sum(daemons))}
        client.disconnect()
        client.loop_stop()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        topo.close()
    return result


def cut_table(results: list[dict]) -> str:
    rows = ["| devices | v2 pushed with one site cut off: others activated, last s | that site's devices caught up, "
            "s after its link came back |", "|---|---|---|"]
    for r in results:
        c = r["cut_site"]
        rows.append(f"| {r['devices']} | {c['others_activated']}, {c['others_last_s']} | {c['caught_up']} of "
                    f"{c['cut_site_devices']}, {c['caught_up_after_link_s']} |")
    return "\n".join(rows)


def table(results: list[dict]) -> str:
    rows = ["| devices | start-up s | push: activated, first / median / last s | push: broker CPU s, central / "
            "sites | pool: prompts, answered once, lost, twice, all answered s, devices used | RSS MiB: central / "
            "site brokers / daemon mean |", "|---|---|---|---|---|---|"]
    for r in results:
        p, q, m = r["push"], r["pool"], r["memory_mib"]
        site_rss = " / ".join(str(v) for k, v in m.items() if k.startswith("site-"))
        cpu = " / ".join(str(v) for v in p["broker_cpu_s"].values())
        rows.append(f"| {r['devices']} | {r['startup_s']} | {p['activated']}, {p['first_s']} / {p['median_s']} / "
                    f"{p['last_s']} | {cpu} | {q['prompts']}, {q['answered'] - q['twice']}, {q['lost']}, {q['twice']}, "
                    f"{q['all_answered_s']}, {q['devices_used']} | {m['central']} / {site_rss} / {m['daemon_mean']} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[10, 20, 50])
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=2, help="pool prompts per device")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "fleet-scale")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    model, adapter, key, pub = build_model(args.cache)
    results = []
    for n in args.devices:
        r = run(n, args.sites, model, adapter, key, pub, args.prompts)
        print(json.dumps(r), flush=True)
        results.append(r)
    print(table(results))
    print()
    print(cut_table(results))


if __name__ == "__main__":
    main()
