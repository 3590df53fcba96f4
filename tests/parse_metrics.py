"""Parses a /metrics scrape (stdin) with the Prometheus project's Python
parsers and prints it as JSON for tests/metrics.rs:
{"name": {"type": ..., "samples": [[sample_name, {labels}, value], ...]}}.

Usage: parse_metrics.py openmetrics|prometheus
The OpenMetrics parser is strict (it fails on any deviation from the
format, a missing "# EOF" included); the Prometheus text parser is the one
its client library uses for format 0.0.4. A parse error exits non-zero.
"""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus


def main():
    text = sys.stdin.read()
    parse = parse_openmetrics if sys.argv[1] == "openmetrics" else parse_prometheus
    families = {}
    for family in parse(text):
        if family.name in families:
            raise SystemExit(f"family {family.name} appears twice")
        families[family.name] = {
            "type": family.type,
            "help": family.documentation,
            "samples": [[s.name, s.labels, s.value] for s in family.samples],
        }
    json.dump(families, sys.stdout)


if __name__ == "__main__":
    main()
