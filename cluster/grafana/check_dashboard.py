"""Checks a Grafana dashboard against what Ray really exports: every metric its PromQL names must be in a scrape.

    python cluster/grafana/check_dashboard.py cluster/grafana/sam3-serve.json http://NODE:METRICS_PORT/metrics ...

Each URL is a Ray node's metrics agent (`ray.nodes()[i]["MetricsExportPort"]`, or Prometheus' own federation
endpoint); their names are pooled. It exits 1 listing each missing metric and the panels that name it, and the
problems of the JSON model itself (panel ids, datasources, targets without `expr`). Standard library only.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from collections.abc import Iterable, Iterator

# PromQL words that are not metric names: aggregations, keywords, and the modifiers' label lists are skipped apart
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
                "quantile", "limitk", "limit_ratio"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
            "inf", "nan", "start", "end"}
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}  # followed by (label, ...)

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[[^\]]*\]\]")  # Grafana's $var, ${var}, ${var:fmt}, [[var]]
_COMMENT = re.compile(r"#[^\n]*")
_TOKEN = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)|(\()|(\))|(\{)|(\})|(\[)|(\])")
_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{|\s)", re.M)
_TYPE = re.compile(r"^# TYPE ([A-Za-z_:][\w:]*) ", re.M)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana variables allowed); functions, aggregations,
    keywords, label names and string literals are not names."""
    text = _COMMENT.sub(" ", _STRING.sub('""', _VARIABLE.sub("1", expr)))
    tokens = list(_tokens(text))
    names: set[str] = set()
    braces = brackets = 0  # inside {label matchers} or [range:step]
    i = 0
    while i < len(tokens):
        kind, value = tokens[i]
        following = tokens[i + 1][0] if i + 1 < len(tokens) else None
        braces += (kind == "{") - (kind == "}")
        brackets += (kind == "[") - (kind == "]")
        if kind == "word" and not braces and not brackets:
            lowered = value.lower()
            if lowered in LABEL_LISTS and following == "(":
                while i < len(tokens) and tokens[i][0] != ")":  # by (label, ...): label names
                    i += 1
            elif lowered not in KEYWORDS and lowered not in AGGREGATIONS and following != "(":
                names.add(value)  # not a function call, an aggregation or a keyword
        i += 1
    return names


def _tokens(text: str) -> Iterator[tuple[str, str]]:
    for match in _TOKEN.finditer(text):
        word = match.group(1)
        yield ("word", word) if word is not None else (match.group(0), match.group(0))


def template_exprs(query) -> list[str]:
    """The PromQL inside a Grafana Prometheus variable query (`label_values(metric{...}, label)`,
    `query_result(expr)`); `label_values(label)` and `metrics(regex)` name no metric."""
    text = query.get("query", "") if isinstance(query, dict) else str(query or "")
    text = text.strip()
    match = re.fullmatch(r"label_values\((.*),\s*[\w$]+\s*\)", text, re.S)
    if match:
        return [match.group(1)]
    match = re.fullmatch(r"query_result\((.*)\)", text, re.S)
    if match:
        return [match.group(1)]
    return []


def panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, those nested in (collapsed) rows included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((f"panel {panel.get('id')} {panel.get('title')!r}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            found.extend((f"variable ${variable.get('name')}", e) for e in template_exprs(variable.get("query")))
    return found


def exported_names(scrape: str) -> set[str]:
    """Names in a Prometheus text exposition: every sample's (histograms' _bucket, _sum, _count) and every # TYPE."""
    return set(_SAMPLE.findall(scrape)) | set(_TYPE.findall(scrape))


def missing_metrics(dashboard: dict, exported: Iterable[str]) -> dict[str, list[str]]:
    """Metric name -> the panels naming it, for every name the scrape lacks."""
    have, missing = set(exported), {}
    for where, expr in expressions(dashboard):
        for name in sorted(metric_names(expr) - have):
            missing.setdefault(name, []).append(where)
    return missing


def model_problems(dashboard: dict) -> list[str]:
    """What keeps the JSON from being an importable dashboard on a ${datasource} Prometheus variable."""
    problems = []
    variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
    source = variables.get("datasource")
    if not source or source.get("type") != "datasource" or source.get("query") != "prometheus":
        problems.append("no `datasource` template variable of type datasource, query prometheus")
    if not dashboard.get("title") or not dashboard.get("uid") or not isinstance(dashboard.get("schemaVersion"), int):
        problems.append("the dashboard needs a title, a uid and a schemaVersion")
    seen: dict[int, str] = {}
    for panel in panels(dashboard):
        title, panel_id = panel.get("title"), panel.get("id")
        if not isinstance(panel_id, int):
            problems.append(f"panel {title!r} has no integer id")
        elif panel_id in seen:
            problems.append(f"panel id {panel_id} is used by {seen[panel_id]!r} and {title!r}")
        else:
            seen[panel_id] = title
        if not {"h", "w", "x", "y"} <= set(panel.get("gridPos", {})):
            problems.append(f"panel {title!r} has no gridPos")
        if panel.get("type") == "row":
            continue
        if (panel.get("datasource") or {}).get("uid") != "${datasource}":
            problems.append(f"panel {title!r}: datasource is not ${{datasource}}")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"panel {title!r} has no targets")
        for target in targets:
            if not str(target.get("expr", "")).strip():
                problems.append(f"panel {title!r}: target {target.get('refId')} has no expr")
            if (target.get("datasource") or panel["datasource"]).get("uid") != "${datasource}":
                problems.append(f"panel {title!r}: target {target.get('refId')} datasource is not ${{datasource}}")
        if len({t.get("refId") for t in targets}) != len(targets):
            problems.append(f"panel {title!r}: refIds are not unique")
    return problems


def report(dashboard: dict, exported: Iterable[str]) -> list[str]:
    """Every problem, one line each: the JSON model's, then each missing metric with the panels that name it."""
    lines = model_problems(dashboard)
    for name, where in sorted(missing_metrics(dashboard, exported).items()):
        lines.append(f"{name}: not exported (named by {', '.join(dict.fromkeys(where))})")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    with open(argv[0]) as handle:
        dashboard = json.load(handle)
    exported: set[str] = set()
    for url in argv[1:]:
        with urllib.request.urlopen(url, timeout=30) as response:
            exported |= exported_names(response.read().decode())
    lines = report(dashboard, exported)
    for line in lines:
        print(line)
    names = set().union(*(metric_names(e) for _, e in expressions(dashboard)))
    shown = [p for p in panels(dashboard) if p.get("type") != "row"]
    print(f"{len(names)} metric names in {len(shown)} panels; {len(lines)} problems")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
