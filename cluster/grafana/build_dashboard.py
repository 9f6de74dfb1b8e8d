"""Writes cluster/grafana/sam3-serve.json, the Grafana dashboard of the service (docs/operations.md, Dashboards).

The JSON is generated so that every front door's route matcher is written once: run
`python cluster/grafana/build_dashboard.py` after changing this file (tests/integration/test_dashboard.py checks that
the JSON is what this script writes, and that every metric a panel names is one the running service exports).
"""

from __future__ import annotations

import json
from pathlib import Path

OUTPUT = Path(__file__).resolve().with_name("sam3-serve.json")
UID = "sam3-serve"
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "[$__rate_interval]"
APP = 'application=~"$application"'
P = "$route_prefix"  # the application's route prefix: "" when it is served at "/" (make serve, cluster/*.yaml)

# Front doors as Serve's HTTP proxy labels them: `route` is the application's route prefix plus the FastAPI route
# pattern (`/v1/video/sessions/{session_id}`); a request no pattern matches (unknown paths, and every call of the
# Gradio app mounted at /ui but its page) is labelled with the bare prefix. Each door is one set of matchers; together
# they partition the routes (the integration test checks that against the routes the service really reports).
FRONT_DOORS: list[tuple[str, str]] = [
    ("native /v1", f'route=~"{P}/v1/.*", route!~"{P}/v1/sam3-image"'),
    ("oxen /api/ai", f'route=~"{P}/api/(ai/.*|media/.*|events)"'),
    ("segmind /v1/sam3-image /v2", f'route=~"{P}/(v1/sam3-image|v2/.*)"'),
    ("roboflow /sam3", f'route=~"{P}/sam3/.*"'),
    ("hf space /api/predict", f'route=~"{P}/api/(predict|sam2_compatible)"'),
    ("web UI page /ui", f'route=~"{P}/ui(/.*)?"'),
    ("ops /healthz /readyz /docs", f'route=~"{P}/(healthz|readyz|docs.*|redoc|openapi[.]json)"'),
    ("unmatched (web UI calls, unknown paths)", f'route=~"{P}/?"'),
]
WEB_UI = f'{APP}, deployment="WebUI"'  # the WebUI replica sees every call of the web UI, its Gradio API included


def _quantile(q: float, metric: str, matchers: str, by: str = "") -> str:
    return f"histogram_quantile({q}, sum by (le{by}) (rate({metric}_bucket{{{matchers}}}{RATE})))"


def _mean(metric: str, matchers: str) -> str:
    return f"sum(rate({metric}_sum{{{matchers}}}{RATE})) / sum(rate({metric}_count{{{matchers}}}{RATE}))"


def _target(expr: str, legend: str) -> dict:
    return {"expr": expr, "legendFormat": legend}


def _panel(title: str, description: str, unit: str, targets: list[dict], width: int = 12, kind: str = "timeseries",
           stack: bool = False) -> dict:
    custom = {"lineWidth": 1, "fillOpacity": 10, "showPoints": "never", "spanNulls": True}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    return {
        "type": kind, "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit, "min": 0, **({"custom": custom} if kind == "timeseries" else {})},
                        "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max", "lastNotNull"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}} if kind == "timeseries" else
                   {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "auto"},
        "targets": [{**t, "datasource": DS, "refId": chr(ord("A") + i)} for i, t in enumerate(targets)],
        "_width": width,
    }


def _row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def _per_door(expr, legend: str = "{door}") -> list[dict]:
    return [_target(expr(matchers), legend.format(door=door)) for door, matchers in FRONT_DOORS]


def front_door_panels() -> list[dict]:
    requests = "ray_serve_num_http_requests_total"
    errors = "ray_serve_num_http_error_requests_total"
    latency = "ray_serve_http_request_latency_ms"
    return [
        _row("Front doors (Serve's HTTP proxy)"),
        _panel("Requests/s by front door", "Every HTTP request Serve's proxy answered, grouped by the route prefix of "
               "each provider's API; the WebUI replica's line counts every call of the web UI (its Gradio API too).",
               "reqps", [*_per_door(lambda m: f"sum(rate({requests}{{{APP}, {m}}}{RATE}))"),
                         _target(f"sum(rate(ray_serve_deployment_request_counter_total{{{WEB_UI}}}{RATE}))",
                                 "web UI (WebUI replica)")]),
        _panel("Error answers/s by front door (4xx and 5xx)", "Serve's count of error responses, by status code.",
               "reqps", _per_door(lambda m: f"sum by (error_code) (rate({errors}{{{APP}, {m}}}{RATE}))",
                                  "{door} {{{{error_code}}}}")),
        _panel("Latency p50 by front door", "End-to-end latency measured at Serve's proxy (a propagation or an "
               "event stream counts until its last byte).", "ms",
               [*_per_door(lambda m: _quantile(0.5, latency, f"{APP}, {m}")),
                _target(_quantile(0.5, "ray_serve_deployment_processing_latency_ms", WEB_UI), "web UI (WebUI replica)")]),
        _panel("Latency p99 by front door", "End-to-end latency measured at Serve's proxy.", "ms",
               [*_per_door(lambda m: _quantile(0.99, latency, f"{APP}, {m}")),
                _target(_quantile(0.99, "ray_serve_deployment_processing_latency_ms", WEB_UI), "web UI (WebUI replica)")]),
        _panel("Requests/s by route and status", "Serve's own labels, ungrouped: the route pattern and the status code.",
               "reqps", [_target(f"sum by (route, status_code) (rate({requests}{{{APP}}}{RATE}))",
                                 "{{route}} {{status_code}}")], width=24),
    ]


def model_panels() -> list[dict]:
    enc, dec = "ray_sam3_encoder_batch_size", "ray_sam3_decoder_batch_size"
    enc_wait, dec_wait = "ray_sam3_encoder_queue_wait_ms", "ray_sam3_decoder_queue_wait_ms"
    lookups = "ray_sam3_embedding_cache_lookups_total"
    return [
        _row("Model pipeline"),
        _panel("Encoder batch size (images per batch)", "Images per backbone pass (SAM3_ENCODER_MAX_BATCH_SIZE caps it).",
               "short", [_target(_mean(enc, APP), "mean"), _target(_quantile(0.5, enc, APP), "p50"),
                         _target(_quantile(0.99, enc, APP), "p99")]),
        _panel("Encoder throughput", "Images encoded and batches run per second, all encoder replicas.", "short",
               [_target(f"sum(rate(ray_sam3_encoder_images_total{{{APP}}}{RATE}))", "images/s"),
                _target(f"sum(rate({enc}_count{{{APP}}}{RATE}))", "batches/s")]),
        _panel("Encoder queue wait", "How long an image waited in the encoder's batcher before its batch started.",
               "ms", [_target(_mean(enc_wait, APP), "mean"), _target(_quantile(0.5, enc_wait, APP), "p50"),
                      _target(_quantile(0.99, enc_wait, APP), "p99")]),
        _panel("Decoder batch size (requests per batch)", "Requests that share one decoder batch (their necks, DETR "
               "and mask-decoder forwards); SAM3_DECODER_MAX_BATCH_SIZE caps it.", "short",
               [_target(_mean(dec, APP), "mean"), _target(_quantile(0.99, dec, APP), "p99"),
                _target(f"sum(rate({dec}_count{{{APP}}}{RATE}))", "batches/s")]),
        _panel("Decoder queue wait", "How long a request waited in the decoder's batcher before its batch started.",
               "ms", [_target(_mean(dec_wait, APP), "mean"), _target(_quantile(0.5, dec_wait, APP), "p50"),
                      _target(_quantile(0.99, dec_wait, APP), "p99")]),
        _panel("Embedding cache hit rate", "Hits over lookups of the embedding cache (by image bytes or image_id), "
               "every ingress replica.", "percentunit",
               [_target(f'sum(rate({lookups}{{result="hit",{APP}}}{RATE})) / sum(rate({lookups}{{{APP}}}{RATE}))',
                        "hit rate")],
               width=6, kind="stat"),
        _panel("Embedding cache lookups/s", "Lookups by result, every ingress replica.", "reqps",
               [_target(f"sum by (result) (rate({lookups}{{{APP}}}{RATE}))", "{{result}}")], width=6, stack=True),
    ]


def state_panels() -> list[dict]:
    return [
        _row("Sessions, streams and queues"),
        _panel("Open video sessions and live streams", "Sessions of /v1/video/sessions (SAM3_VIDEO_MAX_SESSIONS caps "
               "them) and WebSocket streams of /v1/video/streams (SAM3_VIDEO_MAX_STREAMS).", "short",
               [_target(f"sum(ray_sam3_video_sessions_open{{{APP}}})", "video sessions"),
                _target(f"sum(ray_sam3_video_streams_open{{{APP}}})", "live streams")]),
        _panel("Async queue depth", "Jobs of the Oxen queue (/api/ai/queue) and Segmind's /v2 waiting for a worker "
               "and running (SAM3_JOBS_CONCURRENCY per JobRunner replica).", "short",
               [_target(f"sum by (status) (ray_sam3_jobs{{{APP}}})", "{{status}}")], stack=True),
        _panel("Serve: requests queued at handles, per deployment", "Requests a caller's handle holds until a replica "
               "has room (max_ongoing_requests); max_queued_requests bounds them with a 503.", "short",
               [_target(f"sum by (deployment) (ray_serve_deployment_queued_queries{{{APP}}})", "{{deployment}}")]),
        _panel("Serve: requests running at replicas, per deployment", "What Serve's autoscaler compares with "
               "target_ongoing_requests (plus the queued ones).", "short",
               [_target(f"sum by (deployment) (ray_serve_replica_processing_queries{{{APP}}})", "{{deployment}}")]),
    ]


def refusal_panels() -> list[dict]:
    return [
        _row("Refusals"),
        _panel("Admission outcomes/s (image model routes)", "The ingress' admission gate, every ingress replica: "
               "admitted, waited, refused_overload (503), refused_deadline (503), refused_key_limit (429), "
               "cancelled_waiting, expired_waiting.", "reqps",
               [_target(f"sum by (outcome) (rate(ray_sam3_admission_total{{{APP}}}{RATE}))", "{{outcome}}")]),
        _panel("429 and 503 answers/s by front door", "Whoever answered them: the admission gate, the video caps, "
               "the queue's per-key limits or Serve's own backpressure.", "reqps",
               _per_door(lambda m: 'sum by (status_code) (rate(ray_serve_num_http_requests_total'
                                   f'{{{APP}, status_code=~"429|503", {m}}}{RATE}))', "{door} {{{{status_code}}}}")),
    ]


def templating() -> dict:
    return {"list": [
        {"type": "datasource", "name": "datasource", "label": "Prometheus", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
        {"type": "query", "name": "application", "label": "Serve application", "datasource": DS,
         "query": {"query": "label_values(ray_serve_num_http_requests_total, application)", "refId": "apps"},
         "definition": "label_values(ray_serve_num_http_requests_total, application)",
         "includeAll": True, "allValue": ".*", "multi": True, "refresh": 2, "sort": 1,
         "current": {"text": "All", "value": "$__all"}, "hide": 0, "regex": "", "options": []},
        {"type": "textbox", "name": "route_prefix", "label": "Route prefix (empty for /)", "query": "",
         "current": {"text": "", "value": ""}, "hide": 0, "options": []},
    ]}


def layout(panels: list[dict]) -> list[dict]:
    """Ids and grid positions, left to right and top down; rows span the width."""
    x = y = row_height = 0
    out = []
    for panel_id, panel in enumerate(panels, start=1):
        panel = {"id": panel_id, **panel}
        width = 24 if panel["type"] == "row" else panel.pop("_width")
        height = 1 if panel["type"] == "row" else 8
        if x + width > 24 or panel["type"] == "row":
            x, y, row_height = 0, y + row_height, 0
        panel["gridPos"] = {"h": height, "w": width, "x": x, "y": y}
        x, row_height = x + width, max(row_height, height)
        if panel["type"] == "row":
            x, y, row_height = 0, y + height, 0
        out.append(panel)
    return out


def dashboard() -> dict:
    panels = front_door_panels() + model_panels() + state_panels() + refusal_panels()
    return {
        "__requires": [{"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
                       {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
                       {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""},
                       {"type": "panel", "id": "stat", "name": "Stat", "version": ""}],
        "id": None, "uid": UID, "title": "sam3-serve", "tags": ["sam3", "ray-serve"],
        "description": "sam3-serve: front doors, model pipeline, sessions and queues, refusals (docs/operations.md).",
        "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"}, "timepicker": {}, "timezone": "",
        "annotations": {"list": []}, "links": [], "templating": templating(), "panels": layout(panels),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
