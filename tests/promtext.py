"""Read a Prometheus textfile the way Prometheus would: with prometheus-client's own parser."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

Labels = frozenset[tuple[str, str]]


def samples(text: str) -> dict[str, dict[Labels, float]]:
    """Every sample of the exposition text: name -> labels -> value."""
    out: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


class Metrics:
    """One snapsync textfile: one policy's. Every series must carry the same ``policy`` label (node_exporter
    drops a series two files share), and lookups without a ``policy`` get the file's."""

    def __init__(self, path: Path) -> None:
        self.samples = samples(path.read_text())
        policies = {dict(labels).get("policy", "") for series in self.samples.values() for labels in series}
        assert len(policies) == 1 and "" not in policies, f"{path}: policy labels {policies}"
        (self.policy,) = policies

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get(name, {}).get(frozenset(({"policy": self.policy} | labels).items()))

    def __getitem__(self, key: str) -> float:
        """``m["name"]`` for a sample with no label but the policy."""
        value = self.get(key)
        assert value is not None, f"no sample {key} in {sorted(self.samples)}"
        return value

    def one(self, name: str, **labels: str) -> float:
        value = self.get(name, **labels)
        assert value is not None, f"no sample {name}{labels}; have {self.samples.get(name)}"
        return value
