"""The deployment files are what their tools accept: promtool (rules, and the rules' own unit tests),
systemd-analyze (units), nix-instantiate (the NixOS module), and our CLI (every command they run)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.required import tool

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service")) + sorted((DEPLOY / "systemd").glob("*.timer"))


def test_alerting_rules_pass_promtool_and_their_unit_tests() -> None:
    promtool = tool("promtool")
    checked = subprocess.run([promtool, "check", "rules", "snapsync.rules.yml"], cwd=DEPLOY / "prometheus", capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 11 rules found" in checked.stdout
    tested = subprocess.run([promtool, "test", "rules", "snapsync.rules.test.yml"], cwd=DEPLOY / "prometheus", capture_output=True, text=True)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def _written() -> dict[str, set[str]]:
    """Every series name snapsync writes, with its labels, from a state that has every kind of entry."""
    from datetime import UTC, datetime

    from snapsync.ops.metrics import families

    everything = {
        "commands": {"run": {"last_run": 1.0, "ok": False, "duration": 1.0, "last_success": 1.0, "failures": 1}},
        "groups": {"g": {"ok": True, "last_success": 1.0, "newest_snapshot": 1.0, "kept": 1, "deleted_total": 0,
                         "failures": {"hook": 1}, "hooks": [{"index": 0, "type": "freeze", "ok": True, "seconds": 1.0, "paused": 0.1}]}},
        "targets": {"g/t": {"group": "g", "target": "t", "direction": "push", "ok": True, "last_duration": 1.0, "last_sent_bytes": 1,
                            "sent_bytes_total": 1, "sent_total": 1, "last_success": 1.0, "newest_copy": 1.0, "lag": 0.0, "kept": 1}},
        "drills": {"g/t": {"group": "g", "target": "t", "ok": True, "last_run": 1.0, "duration": 1.0, "restored_bytes": 1, "last_success": 1.0}},
    }
    written: dict[str, set[str]] = {}
    for family in families(everything, datetime.now(UTC), "h", {("g", ""): (1.0, 2.0), ("g", "t"): (1.0, 2.0)}, policy="p"):
        for sample in family.samples:
            written.setdefault(sample.name, set()).update(sample.labels)
    return written


def test_every_metric_the_rules_use_is_one_snapsync_writes() -> None:
    rules = (DEPLOY / "prometheus" / "snapsync.rules.yml").read_text()
    used = set(re.findall(r"\b(snapsync_[a-z_]+)", rules))
    assert used - set(_written()) == set()


SCRAPE_LABELS = {"instance", "job"}
"""Labels Prometheus adds to every series it scrapes from node_exporter."""


def test_the_grafana_dashboard_asks_only_for_series_and_labels_snapsync_writes() -> None:
    import json

    dashboard = json.loads((DEPLOY / "grafana" / "snapsync.json").read_text())
    written = _written()
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert len(queries) >= 12 and {p["type"] for p in dashboard["panels"]} >= {"timeseries", "table"}
    for query in queries:
        names = re.findall(r"\b(snapsync_[a-z_]+)", query)
        assert names and set(names) <= set(written), query
        for name, selector in re.findall(r"\b(snapsync_[a-z_]+)\{([^}]*)\}", query):
            asked = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
            assert asked <= written[name] | SCRAPE_LABELS, (query, asked - written[name])
        available = set().union(*(written[n] for n in names)) | SCRAPE_LABELS
        for group in re.findall(r"\bby \(([^)]*)\)", query):
            assert {g.strip() for g in group.split(",")} <= available, query
        legend_labels = set()
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                if target["expr"] == query:
                    legend_labels |= set(re.findall(r"\{\{(\w+)\}\}", target.get("legendFormat", "")))
        assert legend_labels <= available, (query, legend_labels - available)
        counters = [n for n in names if n.endswith("_total")]
        assert all(re.search(rf"(rate|increase)\({n}\b", query) for n in counters), f"a counter read raw: {query}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and all({"x", "y", "w", "h"} <= set(p["gridPos"]) for p in dashboard["panels"])


def installed_units(tmp_path: Path) -> list[Path]:
    """The units as shipped, with ExecStart pointing at this checkout's snapsync (verify needs it to exist)."""
    snapsync = Path(sys.executable).with_name("snapsync")
    assert snapsync.exists(), snapsync
    out = []
    for unit in UNITS:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/usr/local/bin/snapsync", str(snapsync)))
        out.append(copy)
    return out


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    units = installed_units(tmp_path)
    verified = subprocess.run([analyze, "verify", *map(str, units)], capture_output=True, text=True)
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stdout + verified.stderr


def test_units_are_persistent_randomized_and_sandboxed() -> None:
    for timer in (DEPLOY / "systemd").glob("*.timer"):
        text = timer.read_text()
        assert re.search(r"^RandomizedDelaySec=\S+", text, re.M), timer.name
        assert re.search(r"^OnCalendar=\S", text, re.M), timer.name
        assert timer.with_suffix(".service").exists(), timer.name
        if timer.name != "snapsync-check.timer":
            assert "\nPersistent=true\n" in text, timer.name
    for service in (DEPLOY / "systemd").glob("*.service"):
        text = service.read_text()
        for option in ("NoNewPrivileges=yes", "PrivateTmp=yes", "ProtectKernelModules=yes", "RestrictAddressFamilies=",
                       "SystemCallArchitectures=native", "UMask=0077"):
            assert option in text, (service.name, option)
        assert "ProtectControlGroups" not in text or service.name == "snapsync-check.service"  # freeze hooks write cgroup.freeze


def exec_starts(text: str) -> list[list[str]]:
    return [shlex.split(m) for m in re.findall(r"^ExecStart=(.+)$", text, re.M)]


def test_every_command_the_units_and_cron_run_is_one_snapsync_accepts(tmp_path: Path) -> None:
    commands = [argv for unit in (DEPLOY / "systemd").glob("*.service") for argv in exec_starts(unit.read_text())]
    for line in (DEPLOY / "cron" / "snapsync").read_text().splitlines():
        if not line.strip() or line.startswith("#") or re.match(r"^[A-Z_]+=", line):
            continue
        fields = line.split(None, 6)
        assert len(fields) == 7, line
        minute, hour, dom, month, dow, user, command = fields
        for field, top in ((minute, 59), (hour, 23), (dom, 31), (month, 12), (dow, 7)):
            assert re.fullmatch(r"\*(/\d+)?|\d+(-\d+)?(,\d+(-\d+)?)*(/\d+)?", field), (field, line)
            assert all(int(n) <= top for n in re.findall(r"\d+", field.split("/")[0])), (field, line)
        assert user == "root"
        snippet = command[command.index("snapsync"):]
        commands.append(shlex.split(re.split(r"[)>|]", snippet)[0]))
    assert len(commands) == 6
    for argv in commands:
        assert Path(argv[0]).name == "snapsync", argv
        args = [a if a != "/etc/snapsync/policy.toml" else str(tmp_path / "absent.toml") for a in argv[1:]]
        assert str(tmp_path / "absent.toml") in args, argv  # each names the policy: never run it here for real
        proc = subprocess.run([sys.executable, "-m", "snapsync", *args], capture_output=True, text=True)
        # Every option was accepted: it got as far as reading the (absent) policy.
        assert proc.returncode == 2 and "cannot read the policy file" in proc.stdout + proc.stderr, (argv, proc.stdout, proc.stderr)
        assert "Usage:" not in proc.stderr


@pytest.mark.parametrize("name", ["module.nix", "package.nix", "source.nix"])
def test_nix_files_parse(name: str) -> None:
    """Only that they parse: tests/nixos/ evaluates the module with nixpkgs' module system."""
    nix = tool("nix-instantiate")
    parsed = subprocess.run([nix, "--parse", str(DEPLOY / "nixos" / name)], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr


def test_every_metric_is_documented() -> None:
    from snapsync.ops.metrics import METRICS

    doc = (DEPLOY.parent / "docs" / "monitoring.md").read_text()
    missing = [n + ("_total" if kind == "counter" else "") for n, (kind, _, _) in METRICS.items()]
    assert [n for n in missing if f"`{n}`" not in doc] == []
