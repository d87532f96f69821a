"""Two policies on one host, each with its own textfile, scraped by the real node_exporter (Debian's
``prometheus-node-exporter``, textfile collector only): every snapsync series of both files arrives,
told apart by its ``policy`` label, the scrape has no error, and one policy's failing run shows beside
the other's good one. Without the label node_exporter keeps one of two equal series and says nothing
(``node_textfile_scrape_error`` stays 0), so a failure could hide behind the healthy policy."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_subvolume
from tests.promtext import Labels, samples
from tests.replication.helpers import run_json, write_policy
from tests.required import tool
from tests.sshd import free_port

pytestmark = pytest.mark.btrfs

POLICIES = ("databases", "web")  # the policy files' stems, and so the policy labels


def node_exporter_binary() -> str:
    """CI installs it (install.sh): there a missing binary fails instead of skipping the tier."""
    return tool("prometheus-node-exporter", path="/usr/bin:/usr/sbin")


class NodeExporter:
    """Our own instance: its own loopback port and directory, so a system one on :9100 is no matter."""

    def __init__(self, binary: str, directory: Path, log: Path) -> None:
        self.binary, self.directory, self.log = binary, directory, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        for _ in range(5):  # the port is free when chosen; another process may take it before we bind
            port = free_port()
            with self.log.open("wb") as log:
                self.proc = subprocess.Popen(
                    [self.binary, "--collector.disable-defaults", "--collector.textfile",
                     f"--collector.textfile.directory={self.directory}", f"--web.listen-address=127.0.0.1:{port}"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                )
            self.url = f"http://127.0.0.1:{port}/metrics"
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    self.scrape()
                    return
                except (urllib.error.URLError, ConnectionError):
                    time.sleep(0.05)
            self.stop()
        raise AssertionError(f"node_exporter did not start:\n{self.log.read_text()}")

    def scrape(self) -> str:
        with urllib.request.urlopen(self.url, timeout=10) as response:  # noqa: S310 (our own loopback URL)
            assert response.status == 200
            return str(response.read().decode())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[NodeExporter]:
    binary = node_exporter_binary()
    directory = tmp_path / "textfiles"
    directory.mkdir(mode=0o755)
    server = NodeExporter(binary, directory, tmp_path / "node-exporter.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def snapsync_samples(text: str) -> dict[tuple[str, Labels], float]:
    return {(name, labels): value for name, series in samples(text).items() if name.startswith("snapsync_")
            for labels, value in series.items()}


def test_two_policies_reach_prometheus_through_node_exporter_and_a_failure_shows(
    exporter: NodeExporter, btrfs_root: Path, target_root: Path, tmp_path: Path
) -> None:
    policies = {}
    for name in POLICIES:  # the same group and target names in both: only the policy label tells them apart
        data = make_subvolume(btrfs_root / name / "app", f"{name}\n")
        (target_root / name).mkdir()
        (tmp_path / name).mkdir()
        policy = write_policy(tmp_path / name / f"{name}.toml", [data], {"usb": f'type = "local"\npath = "{target_root / name}"'},
                              interval="1s")
        text = policy.read_text().replace("[targets.", '[[groups.app.hooks]]\ntype = "command"\npre = ["true"]\n[targets.', 1)
        policy.write_text(text + f'[monitoring]\ntextfile = "{exporter.directory / name}.prom"\n')
        policies[name] = policy
        run_json("-p", str(policy), "run")
    failing = policies["databases"]
    failing.write_text(failing.read_text().replace('pre = ["true"]', 'pre = ["false"]'))
    time.sleep(1.1)  # snapshot names have one-second resolution
    failed = run_json("-p", str(failing), "run", expect=1)
    assert failed["groups"][0]["snapshot"] is None

    files = {name: snapsync_samples((exporter.directory / f"{name}.prom").read_text()) for name in POLICIES}
    for name, written in files.items():
        assert {dict(labels).get("policy") for _, labels in written} == {name}
    twins = {name: {(n, frozenset(kv for kv in labels if kv[0] != "policy")) for n, labels in f} for name, f in files.items()}
    assert len(twins["web"]) > 20 and twins["web"] <= twins["databases"]  # unlabelled, each of web's would collide

    scraped_text = exporter.scrape()
    scraped = samples(scraped_text)
    arrived = snapsync_samples(scraped_text)
    assert len(arrived) == sum(len(f) for f in files.values())
    assert arrived == files["databases"] | files["web"]  # every series, with its value
    assert scraped["node_textfile_scrape_error"] == {frozenset(): 0}
    mtimes = {dict(labels)["file"] for labels in scraped["node_textfile_mtime_seconds"]}
    assert mtimes == {str(exporter.directory / f"{name}.prom") for name in POLICIES}  # ours, not another exporter's

    def value(name: str, **labels: str) -> float:
        return arrived[(name, frozenset(labels.items()))]

    assert value("snapsync_last_run_success", policy="databases", command="run") == 0
    assert value("snapsync_last_run_success", policy="web", command="run") == 1
    assert value("snapsync_group_ok", policy="databases", group="app") == 0
    assert value("snapsync_group_ok", policy="web", group="app") == 1
    assert value("snapsync_hook_ok", policy="databases", group="app", hook="0", type="command") == 0
    assert value("snapsync_failures_total", policy="databases", group="app", target="", kind="hook") == 1
    assert ("snapsync_failures_total", frozenset({("policy", "web"), ("group", "app"), ("target", ""), ("kind", "hook")})) not in arrived
    assert value("snapsync_snapshots_kept", policy="web", group="app", target="") == 1
    assert "collected before" not in exporter.log.read_text()  # how node_exporter logs a dropped duplicate
