"""The Grafana dashboard (cluster/grafana/sam3-serve.json) against the running service: every metric its panels name
is one the Ray node really exports after traffic through every front door, and the JSON is an importable model.

The first tests need no Ray: the checker (cluster/grafana/check_dashboard.py) on the JSON, on synthetic scrapes and on
a dashboard with a metric nobody exports. The last one deploys the graph, sends traffic and scrapes the node's
metrics agent over HTTP."""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from serve_app.core.config import Config
from tests.integration.conftest import deploy, image_bytes, undeploy

pytestmark = pytest.mark.integration

GRAFANA = Path(__file__).resolve().parents[2] / "cluster" / "grafana"
DASHBOARD_JSON = GRAFANA / "sam3-serve.json"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"grafana_{name}", GRAFANA / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load("check_dashboard")
builder = _load("build_dashboard")

# The project's own metrics as Prometheus sees them (ray_ prefix; counters _total), by type: what a synthetic scrape
# holds, and what docs/operations.md lists.
OWN = {"counter": ["ray_sam3_encoder_images", "ray_sam3_embedding_cache_lookups", "ray_sam3_admission"],
       "histogram": ["ray_sam3_encoder_batch_size", "ray_sam3_encoder_queue_wait_ms", "ray_sam3_decoder_batch_size",
                     "ray_sam3_decoder_queue_wait_ms"],
       "gauge": ["ray_sam3_video_sessions_open", "ray_sam3_video_streams_open", "ray_sam3_jobs"]}
SERVE = {"counter": ["ray_serve_num_http_requests", "ray_serve_num_http_error_requests",
                     "ray_serve_deployment_request_counter"],
         "histogram": ["ray_serve_http_request_latency_ms", "ray_serve_deployment_processing_latency_ms"],
         "gauge": ["ray_serve_deployment_queued_queries", "ray_serve_replica_processing_queries"]}


def _exposition(families: dict[str, list[str]]) -> str:
    """A Prometheus text exposition with one sample of each metric, as Ray's agent writes it."""
    lines = []
    for kind, names in families.items():
        for name in names:
            full = f"{name}_total" if kind == "counter" else name
            lines += [f"# HELP {full} x", f"# TYPE {full} {kind}"]
            if kind == "histogram":
                lines += [f'{name}_bucket{{le="1.0"}} 1.0', f'{name}_bucket{{le="+Inf"}} 1.0', f"{name}_sum 1.0",
                          f"{name}_count 1.0"]
            else:
                lines.append(f'{full}{{Component="core_worker",application="a"}} 1.0')
    return "\n".join(lines) + "\n"


def _dashboard() -> dict:
    return json.loads(DASHBOARD_JSON.read_text())


def _titles(dashboard: dict) -> list[str]:
    return [p["title"] for p in check.panels(dashboard) if p["type"] != "row"]


# ------------------------------------------------------------------------------------------------ no Ray


def test_the_json_is_what_the_builder_writes():
    assert DASHBOARD_JSON.read_text() == builder.render(), "run: python cluster/grafana/build_dashboard.py"


def test_the_dashboard_is_an_importable_model():
    dashboard = _dashboard()
    assert check.model_problems(dashboard) == []
    assert dashboard["id"] is None and dashboard["uid"] == "sam3-serve"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"] == {**variables["datasource"], "type": "datasource", "query": "prometheus"}
    panels = [p for p in check.panels(dashboard) if p["type"] != "row"]
    assert len(panels) >= 16 and all(t["expr"] for p in panels for t in p["targets"])
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_the_checker_passes_the_real_metrics_and_names_a_bogus_one():
    dashboard, exported = _dashboard(), check.exported_names(_exposition({**OWN}) + _exposition(SERVE))
    assert check.report(dashboard, exported) == []
    bogus = copy.deepcopy(dashboard)
    bogus["panels"].append({
        "id": 999, "type": "timeseries", "title": "Nothing", "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 0, "y": 99},
        "targets": [{"refId": "A", "expr": 'sum by (le) (rate(ray_sam3_no_such_metric_bucket{result="hit"}'
                                           '[$__rate_interval])) / sum(ray_sam3_jobs)'}]})
    assert check.report(bogus, exported) == [
        "ray_sam3_no_such_metric_bucket: not exported (named by panel 999 'Nothing')"]
    # one histogram series the scrape lacks is caught too: the _count of a metric whose _bucket is there
    partial = {n for n in exported if n != "ray_sam3_decoder_queue_wait_ms_count"}
    assert list(check.missing_metrics(dashboard, partial)) == ["ray_sam3_decoder_queue_wait_ms_count"]


def test_the_checker_catches_a_broken_model():
    dashboard = _dashboard()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    panels[1]["id"] = panels[0]["id"]
    panels[2]["datasource"] = {"type": "prometheus", "uid": "prom-1"}
    panels[3]["targets"][0]["expr"] = " "
    del panels[4]["targets"]
    problems = check.model_problems(dashboard)
    assert len(problems) == 4, problems
    assert f"panel id {panels[0]['id']} is used by" in problems[0]
    assert "datasource is not ${datasource}" in problems[1] and "has no expr" in problems[2]
    assert problems[3].endswith("has no targets")
    dashboard["templating"]["list"] = [v for v in dashboard["templating"]["list"] if v["name"] != "datasource"]
    assert "no `datasource` template variable" in check.model_problems(dashboard)[0]


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (le, route) (rate(a_bucket{route=~"/v1/.*", le!="x"}[$__rate_interval]))', {"a_bucket"}),
    ('histogram_quantile(0.99, sum(rate(b_bucket[5m])) by (le)) / on (job) group_left (x) c offset 5m', {"b_bucket", "c"}),
    ('label_replace(d, "door", "$1", "route", "(sum|rate)") and ignoring (route) e', {"d", "e"}),
    ('max_over_time(f{a="}{"}[1h:5m] @ start()) > bool 1e3 unless topk(3, g:rule)', {"f", "g:rule"}),
    ('sum without (instance) (h) / count(count_values("v", i))', {"h", "i"}),
    ('vector(1) + time()  # a comment naming not_a_metric', set()),
])
def test_the_tokenizer_keeps_only_metric_names(expr, names):
    assert check.metric_names(expr) == names


def test_the_variable_query_names_its_metric():
    assert check.template_exprs({"query": "label_values(m{job=\"x\"}, application)"}) == ['m{job="x"}']
    assert check.template_exprs("label_values(application)") == []
    names = {n for where, e in check.expressions(_dashboard()) if where.startswith("variable") for n in
             check.metric_names(e)}
    assert names == {"ray_serve_num_http_requests_total"}


# ------------------------------------------------------------------------------------------------ the service

APP = "dash"
EXPORT_WITHIN_S = 90  # Ray's agent publishes what workers recorded every few seconds


@pytest.fixture(scope="module")
def dash_url(serve_instance):
    """The graph with the web UI on and one request in flight per key, so that a second concurrent one is a 429."""
    config = Config(web_ui=True, url_allowlist=[], max_inflight_per_key=1)
    yield deploy(APP, config, serve_instance)
    undeploy(APP)


def _ok(response: requests.Response, status: int = 200) -> dict:
    assert response.status_code == status, (response.request.method, response.url, response.text[:300])
    return response.json() if "json" in response.headers.get("content-type", "") else {}


def _front_doors(url: str) -> None:
    """One request per front door (the first image twice: an embedding cache miss, then a hit)."""
    image = base64.b64encode(image_bytes(3)).decode()
    data_uri = f"data:image/png;base64,{image}"
    native = {"image": image, "prompts": [{"type": "concept", "text": "cat"}]}
    for _ in range(2):
        _ok(requests.post(f"{url}/v1/image/segment", json=native, timeout=120))
    _ok(requests.post(f"{url}/api/ai/images/edit", json={"model": "sam-3-image", "input_image": data_uri,
                                                          "prompt": "cat"}, timeout=120))
    _ok(requests.post(f"{url}/v1/sam3-image", json={"image": image, "text_prompt": "cat"}, timeout=120))
    _ok(requests.post(f"{url}/sam3/concept_segment", json={"image": {"type": "base64", "value": image},
                                                            "prompts": [{"type": "text", "text": "cat"}]}, timeout=120))
    _ok(requests.post(f"{url}/api/predict", json={"data": [image, "cat", 0.5]}, timeout=120))
    _ok(requests.get(f"{url}/ui/", timeout=120))
    _ok(requests.get(f"{url}/ui/config", timeout=120))  # a Gradio call: Serve labels it with the bare prefix
    _ok(requests.get(f"{url}/healthz", timeout=30))
    _ok(requests.get(f"{url}/no/such/route", timeout=30), 404)


def _queues(url: str) -> None:
    """An Oxen queue job and a Segmind /v2 job, each polled until done (the JobStore and the JobRunner)."""
    image = base64.b64encode(image_bytes(4)).decode()
    oxen = _ok(requests.post(f"{url}/api/ai/queue", json={"model": "sam-3-image", "prompt": "cat",
                                                          "input_image": f"data:image/png;base64,{image}"}, timeout=60))
    segmind = _ok(requests.post(f"{url}/v2/sam3-image", json={"image": image, "text_prompt": "cat"}, timeout=60))
    polls = {f"{url}/api/ai/queue/{oxen['generations'][0]['generation_id']}": ("succeeded", "failed", "cancelled"),
             f"{url}/v2/requests/{segmind['request_id']}/status": ("COMPLETED", "FAILED")}
    deadline = time.monotonic() + 180
    for poll, done in polls.items():
        while (status := _ok(requests.get(poll, timeout=30))["status"]) not in done:
            assert time.monotonic() < deadline, f"{poll} still {status}"
            time.sleep(0.2)
        assert status in ("succeeded", "COMPLETED"), (poll, status)


def _video(url: str) -> None:
    from tests.videos import write_video

    opened = _ok(requests.post(f"{url}/v1/video/sessions", data=write_video(4, 48, 64),
                               headers={"Content-Type": "video/mp4"}, timeout=180), 201)
    session = f"{url}/v1/video/sessions/{opened['session_id']}"
    _ok(requests.post(f"{session}/prompts", json={"frame_index": 0, "text": "square"}, timeout=120))
    _ok(requests.delete(session, timeout=60))


def _refusal(url: str) -> None:
    """max_inflight_per_key=1 and auth off (one tenant): of a few concurrent requests some are refused with 429."""
    bodies = [{"image": base64.b64encode(image_bytes(10 + i)).decode(), "prompts": [{"type": "concept", "text": "dog"}]}
              for i in range(4)]
    for _ in range(5):
        with ThreadPoolExecutor(len(bodies)) as pool:
            codes = list(pool.map(lambda b: requests.post(f"{url}/v1/image/segment", json=b, timeout=120).status_code,
                                  bodies))
        assert set(codes) <= {200, 429}, codes
        if 429 in codes:
            return
    raise AssertionError("no request was refused with max_inflight_per_key=1")


def _scrape() -> str:
    import ray

    texts = []
    for node in ray.nodes():
        if node["Alive"]:
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            texts.append(requests.get(url, timeout=30).text)
    return "\n".join(texts)


_LABELS = r'\{((?:[^"}]|"(?:\\.|[^"\\])*")*)\}'  # a label set; values may hold braces (`{session_id}`)


def _series(scrape: str, name: str) -> list[dict[str, str]]:
    """The label sets of every sample of `name` in the scrape."""
    blocks = re.findall(rf"^{name}{_LABELS}", scrape, re.M)
    return [dict(re.findall(r'(\w+)="((?:\\.|[^"\\])*)"', block)) for block in blocks]


def _door_of(route: str, prefix: str) -> list[str]:
    doors = []
    for door, matchers in builder.FRONT_DOORS:
        ok = True
        for op, regex in re.findall(r'route(=~|!~)"([^"]*)"', matchers):
            hit = re.fullmatch(regex.replace("$route_prefix", prefix), route) is not None
            ok = ok and (hit if op == "=~" else not hit)
        if ok:
            doors.append(door)
    return doors


# label values the panels select on, which the traffic above must make appear (Counters export one series per tag set)
SELECTED = (("ray_sam3_embedding_cache_lookups_total", "result", "hit"),
            ("ray_sam3_admission_total", "outcome", "refused_key_limit"),
            ("ray_serve_num_http_requests_total", "status_code", "429"),
            ("ray_serve_num_http_error_requests_total", "error_code", "404"),
            ("ray_serve_deployment_request_counter_total", "deployment", "WebUI"),
            ("ray_serve_deployment_processing_latency_ms_bucket", "deployment", "WebUI"),
            ("ray_sam3_jobs", "status", "queued"),
            ("ray_sam3_encoder_queue_wait_ms_bucket", "application", APP),
            ("ray_sam3_decoder_queue_wait_ms_bucket", "application", APP),
            ("ray_sam3_video_sessions_open", "application", APP),
            ("ray_sam3_video_streams_open", "application", APP))


def _unselected(scrape: str) -> list[str]:
    return [f"{name}{{{label}={value!r}}}: no such series" for name, label, value in SELECTED
            if not any(labels.get(label) == value for labels in _series(scrape, name))]


def test_every_metric_of_the_dashboard_is_exported_by_the_running_service(dash_url):
    started = time.monotonic()
    _front_doors(dash_url)
    _queues(dash_url)
    _video(dash_url)
    _refusal(dash_url)
    traffic_s = time.monotonic() - started
    dashboard = _dashboard()
    deadline = time.monotonic() + EXPORT_WITHIN_S
    while True:  # what workers record reaches the agent every few seconds
        scrape = _scrape()
        problems = check.report(dashboard, check.exported_names(scrape)) + _unselected(scrape)
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(2)
    names = set().union(*(check.metric_names(e) for _, e in check.expressions(dashboard)))
    print(f"\ntraffic {traffic_s:.1f} s, then {time.monotonic() - started - traffic_s:.1f} s until exported; "
          f"{len(_titles(dashboard))} panels name {len(names)} series")
    assert problems == [], "\n".join(problems)
    # the front doors' matchers partition what the proxy reports: each route in exactly one door, no door empty
    routes = {labels["route"] for labels in _series(scrape, "ray_serve_num_http_requests_total")
              if labels.get("application") == APP}
    doors = {route: _door_of(route, f"/{APP}") for route in routes}
    for route, door in sorted(doors.items(), key=lambda item: item[1]):
        print(f"  {door} <- {route}")
    assert all(len(d) == 1 for d in doors.values()), {r: d for r, d in doors.items() if len(d) != 1}
    assert {d[0] for d in doors.values()} == {door for door, _ in builder.FRONT_DOORS}, sorted(routes)
