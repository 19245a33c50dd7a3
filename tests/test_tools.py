"""The shell scripts in tools/ parse (a typo in the Termux boot script would only show on a phone)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from conftest import ROOT, build_wheel

SCRIPTS = sorted([*ROOT.glob("tools/*.sh"), *ROOT.glob("tools/termux/*"), ROOT / ".ci" / "run"])


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(s.relative_to(ROOT)) for s in SCRIPTS])
def test_shell_script_parses(script):
    shell = "sh" if "start-nomoat" in script.name else "bash"
    done = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(s.relative_to(ROOT)) for s in SCRIPTS])
def test_shellcheck(script):
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (.ci/run installs it)")
    shell = "sh" if "start-nomoat" in script.name else "bash"
    done = subprocess.run(["shellcheck", "-s", shell, str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_bench_chat_feeds_each_turn_from_the_cache(exported):
    """tools/bench_chat.py: with the prompt cache, a later turn feeds fewer tokens than its whole prompt."""
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_chat.py"), str(exported("int4-tiny")),
                          "--turns", "2", "--max-tokens", "4", "--threads", "1"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(rows) == 2
    for _turn, prompt, fed_off, _, fed_on, *_ in rows[1:]:
        assert int(fed_on) < int(fed_off) and int(fed_on) < int(prompt)


def test_profile_decode_accounts_for_every_layer(exported):
    """tools/profile_decode.py: one GroupQueryAttention and one of each linear per layer and step, shares add up."""
    import json
    import sys

    folder = exported("int4-tiny")
    layers = json.loads((folder / "nomoat.json").read_text())["config"]["num_layers"]
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "profile_decode.py"), str(folder),
                          "--context", "8", "--tokens", "4", "--threads", "1"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = {line[:34].strip(): line[34:].split() for line in out.stdout.splitlines()[3:]}
    assert int(rows["GroupQueryAttention"][2]) == layers
    for weight in ("self_attn.q_k_v", "self_attn.o_proj", "mlp.gate_up", "mlp.down_proj"):
        assert int(rows[f"MatMulNBits {weight}"][2]) == layers, rows
    assert sum(float(share.rstrip("%")) for _, share, _ in rows.values()) == pytest.approx(100, abs=0.5)


@pytest.mark.slow
@pytest.mark.mqtt
def test_soak_loses_no_qos1_prompt_across_a_broker_restart_and_a_daemon_sigterm(exported):
    """tools/soak_mqtt.py, short: QoS 1 prompts all answered exactly once; QoS 0 ones may be lost (documented)."""
    import json
    import sys

    from conftest import mosquitto_path

    if not mosquitto_path():
        pytest.skip("mosquitto is not installed")
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "soak_mqtt.py"), str(exported("slots", lora_rank=8,
                          precision="fp32")), "--seconds", "15", "--rate", "4", "--grace", "20"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    assert len(report["events"]) == 2
    assert report["qos1"]["sent"] > 20 and report["qos1"]["lost"] == 0 and report["qos1"]["duplicated"] == 0, report
    assert report["qos0"]["duplicated"] == 0 and report["qos0"]["answered_once"] > 0, report


def test_service_install_writes_the_unit_and_the_bundled_one_is_the_same(tmp_path, exported):
    from click.testing import CliRunner
    from nomoat.edge.cli import main
    from nomoat.edge.service import render

    assert (ROOT / "tools" / "systemd" / "nomoat.service").read_text() == \
        render("/home/pi/venv/bin/nomoat", "/home/pi/models/smollm2-135m")
    model = exported("fp32-base", precision="fp32")
    out = tmp_path / "nomoat.service"
    result = CliRunner().invoke(main, ["service", "install", str(model), "-o", str(out), "--config",
                                       str(tmp_path / "nomoat.toml")])
    assert result.exit_code == 0, result.output
    unit = out.read_text()
    assert f"serve {model.resolve()} --config {tmp_path / 'nomoat.toml'}" in unit and "DynamicUser=yes" in unit
    assert "next: write" in result.output
    result = CliRunner().invoke(main, ["service", "install", str(model), "-o", str(out), "--config", "/a b"])
    assert result.exit_code == 1 and "no spaces" in result.output


def test_systemd_unit_verifies(tmp_path):
    """tools/systemd/nomoat.service as systemd reads it (with this venv's nomoat in ExecStart): no unknown keys,
    no errors."""
    import shutil
    import sys

    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    unit = (ROOT / "tools" / "systemd" / "nomoat.service").read_text()
    assert "ExecStart=/home/pi/venv/bin/nomoat serve" in unit and "StateDirectory=nomoat" in unit
    nomoat = shutil.which("nomoat") or str(ROOT / ".venv" / "bin" / "nomoat")
    if not os.path.exists(nomoat):
        nomoat = sys.executable
    (tmp_path / "nomoat.service").write_text(unit.replace("/home/pi/venv/bin/nomoat", nomoat))
    out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "nomoat.service")], capture_output=True,
                         text=True)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out.stdout + out.stderr


FAKE_PROOT = """#!/bin/bash
# proot-distro for the test: "login debian -- CMD" logs CMD (and how many bytes came on stdin), runs nothing
echo "proot-distro $*" >> "$FAKE_LOG"
case "$1" in
  install) touch "$FAKE_ROOT/installed" ;;
  login)
    [ -f "$FAKE_ROOT/installed" ] || { echo "debian is not installed" >&2; exit 1; }
    shift 3
    [ "$*" = true ] && exit 0
    [ -t 0 ] || echo "stdin $(wc -c | tr -d ' ') bytes" >> "$FAKE_LOG"
    case "$*" in *"pip install"*) [ -n "${FAIL_PIP:-}" ] && { echo "pip: no matching distribution" >&2; exit 1; } ;; esac
    ;;
esac
exit 0
"""


def test_termux_install_script_reruns_and_fails_loudly(tmp_path, exported):
    """tools/termux/install.sh against stand-ins for pkg and proot-distro: the second run does not reinstall Debian
    (the old check read `proot-distro list` from stdout, which prints to stderr), files go in through `login`
    (proot-distro 5.x moved the container's folder), and a failed pip install stops it instead of printing
    "installed"."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "proot-distro").write_text(FAKE_PROOT)
    (fake / "pkg").write_text('#!/bin/sh\necho "pkg $*" >> "$FAKE_LOG"\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    wheel = tmp_path / "nomoat-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"x" * 1000)
    model = exported("fp32-base", precision="fp32")
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "HOME": str(tmp_path / "home"),
           "FAKE_LOG": str(log), "FAKE_ROOT": str(tmp_path)}

    def install(**extra):
        return subprocess.run(["bash", str(ROOT / "tools" / "termux" / "install.sh"), str(wheel), str(model)],
                              capture_output=True, text=True, env={**env, **extra}, timeout=60)

    first = install()
    assert first.returncode == 0 and "installed. Next:" in first.stdout, first.stderr
    lines = log.read_text().splitlines()
    assert lines.count("proot-distro install debian") == 1 and "pkg install -y proot-distro" in lines
    assert "stdin 1000 bytes" in lines  # the wheel, through login
    assert any(line.startswith("stdin ") and int(line.split()[1]) > 10000 for line in lines)  # the model's tar
    assert os.access(tmp_path / "home" / ".termux" / "boot" / "start-nomoat", os.X_OK)
    log.write_text("")
    again = install()
    assert again.returncode == 0 and "proot-distro install debian" not in log.read_text(), again.stderr
    failed = install(FAIL_PIP="1")
    assert failed.returncode != 0 and "installed. Next" not in failed.stdout and "no matching distribution" in failed.stderr


def test_the_wheel_installs_one_nomoat_package_and_python_m_nomoat_runs(tmp_path):
    """edge/ and export/ install as nomoat.edge and nomoat.export: the wheel claims no top-level `edge` or
    `export` (names other distributions use), and `python -m nomoat` is the command line."""
    import sys
    import zipfile

    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(tmp_path / "site")
    assert {n.split("/")[0] for n in names} == {"nomoat", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "nomoat/edge/firmware_configs/raspberry-pi-5.toml" in names and "nomoat/__main__.py" in names
    assert "nomoat = nomoat.edge.cli:main" in (tmp_path / "site" / next(
        n for n in names if n.endswith("entry_points.txt"))).read_text()
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    out = subprocess.run([sys.executable, "-m", "nomoat", "doctor", "--profile", "raspberry-pi-5"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode in (0, 1) and "profile      raspberry-pi-5" in out.stdout, out.stdout + out.stderr
    where = subprocess.run([sys.executable, "-c", "import nomoat.edge.cli as c; print(c.__file__); import edge"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.startswith(str(tmp_path / "site")), where.stdout
    assert "No module named 'edge'" in where.stderr
