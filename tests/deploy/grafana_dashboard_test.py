"""deploy/grafana/dashboards/retrace.json asks only for metrics that exist.

Every panel's PromQL may name only metric families that retraced registers:
read from the sources (every `.Name("retrace_...")` and AddGauge name under
server/, so that renaming a metric fails here), plus the router's per-shard
families while the router's source does not register them yet. _bucket,
_sum and _count only on histograms; every histogram_quantile groups by le.
Each expression must parse as PromQL: promtool (Debian's prometheus) checks
a rules file with one recording rule per expression. A broken copy (a
misspelt metric) must be reported.

Exit status 77 (skipped) when promtool is missing.
Environment: RETRACE_SOURCE_DIR (the repository).
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

SKIP = 77
SOURCE_DIR = os.environ.get("RETRACE_SOURCE_DIR") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))
DASHBOARD = os.path.join(SOURCE_DIR, "deploy", "grafana", "dashboards",
                         "retrace.json")
PROMTOOL = shutil.which("promtool")
if PROMTOOL is None:
    print("SKIPPED: promtool is not installed (Debian: prometheus; "
          "scripts/setup.sh lists it)")
    sys.exit(SKIP)

# Grafana's variables, replaced before promtool sees an expression.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m",
                     "$__range": "1h"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left",
                "group_right", "bool", "and", "or", "unless", "offset", "le",
                "inf", "nan"}


def source_families():
    """{name: counter|gauge|histogram} registered by the sources."""
    families = {}
    for path in glob.glob(os.path.join(SOURCE_DIR, "server", "**", "*.cc"),
                          recursive=True):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for kind, name in re.findall(
                r'Build(Counter|Gauge|Histogram)\(\)\s*\.Name\("(retrace_\w+)"\)',
                text):
            families[name] = kind.lower()
        for name in re.findall(r'AddGauge\(\s*\w+,\s*"(retrace_\w+)"', text):
            families[name] = "gauge"
    return families


def known_families():
    return source_families()


def expressions(dashboard):
    for panel in dashboard["panels"]:
        for sub in [panel] + panel.get("panels", []):
            for target in sub.get("targets", []):
                yield sub["title"], target["expr"]


def metric_names(expr):
    """The metric names an expression selects."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)       # strings
    e = re.sub(r"\{[^}]*\}", "", e)                     # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                    # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)",
               "", e)                                   # label lists
    names = []
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group(0)
        rest = e[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_WORDS:
            continue                                    # a function or keyword
        names.append(word)
    return names


def problems(dashboard, families):
    p = []
    for title, expr in expressions(dashboard):
        for name in metric_names(expr):
            base, suffix = name, ""
            m = re.match(r"(.*)_(bucket|sum|count)$", name)
            if m and families.get(m.group(1)) == "histogram":
                base, suffix = m.group(1), m.group(2)
            if base not in families:
                p.append("%s: %s is not a metric retraced exports" % (title, name))
            elif families[base] == "histogram" and not suffix:
                p.append("%s: %s is a histogram; select _bucket, _sum or _count"
                         % (title, name))
        for call in re.findall(r"histogram_quantile\((.*)", expr):
            if not re.search(r"\bby\s*\([^)]*\ble\b", call):
                p.append("%s: histogram_quantile without `by (le, ...)`" % title)
    return p


def promtool_problems(dashboard):
    rules = []
    for i, (title, expr) in enumerate(expressions(dashboard)):
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        rules.append({"record": "retrace:dashboard:%d" % i, "expr": expr})
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        # JSON is YAML: no YAML library needed.
        json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
        f.flush()
        run = subprocess.run([PROMTOOL, "check", "rules", f.name],
                             capture_output=True, text=True, timeout=60)
    return [] if run.returncode == 0 else [run.stdout + run.stderr]


class Dashboard(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        with open(DASHBOARD, encoding="utf-8") as f:
            cls.dashboard = json.load(f)
        cls.families = known_families()

    def test_sources_still_register_the_documented_metrics(self):
        # If this fails, the source parsing above no longer finds them.
        self.assertLessEqual(
            {"retrace_requests_total", "retrace_request_duration_seconds",
             "retrace_stage_duration_seconds", "retrace_ready"},
            set(source_families()))

    def test_every_expression_names_existing_metrics(self):
        found = problems(self.dashboard, self.families)
        self.assertEqual(found, [], "\n".join(found))

    def test_every_expression_parses(self):
        found = promtool_problems(self.dashboard)
        self.assertEqual(found, [], "\n".join(found))

    def test_covers_what_operators_need(self):
        used = {n for _, e in expressions(self.dashboard) for n in metric_names(e)}
        for name in ("retrace_requests_total", "retrace_request_duration_seconds_bucket",
                     "retrace_stage_duration_seconds_bucket",
                     "retrace_batch_size_queries_bucket", "retrace_queue_depth_queries",
                     "retrace_device_memory_bytes", "retrace_ready",
                     "retrace_router_shard_latency_seconds_bucket",
                     "retrace_router_shard_requests_total"):
            self.assertIn(name, used)

    def test_broken_copies_are_reported(self):
        broken = json.loads(json.dumps(self.dashboard))
        target = next(t for panel in broken["panels"]
                      for t in panel.get("targets", [])
                      if "retrace_requests_total" in t["expr"])
        target["expr"] = target["expr"].replace("retrace_requests_total",
                                                "retrace_request_total")
        self.assertTrue(any("retrace_request_total is not a metric" in q
                            for q in problems(broken, self.families)))
        target["expr"] = "sum(rate(retrace_requests_total[5m]"
        self.assertNotEqual(promtool_problems(broken), [])
        renamed = dict(self.families)
        del renamed["retrace_ready"]
        self.assertTrue(any("retrace_ready is not a metric" in q
                            for q in problems(self.dashboard, renamed)))


if __name__ == "__main__":
    unittest.main(verbosity=2)
