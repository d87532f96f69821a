"""Read a Prometheus textfile the way Prometheus would: with prometheus-client's own parser."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


class Metrics:
    def __init__(self, path: Path) -> None:
        self.samples: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
        for family in text_string_to_metric_families(path.read_text()):
            for s in family.samples:
                self.samples.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get(name, {}).get(frozenset(labels.items()))

    def __getitem__(self, key: str) -> float:
        """``m["name"]`` for an unlabelled sample."""
        value = self.get(key)
        assert value is not None, f"no sample {key} in {sorted(self.samples)}"
        return value

    def one(self, name: str, **labels: str) -> float:
        value = self.get(name, **labels)
        assert value is not None, f"no sample {name}{labels}; have {self.samples.get(name)}"
        return value
