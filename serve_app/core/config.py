"""One validated configuration object, built once from the environment at start-up and passed down."""

from __future__ import annotations

import json
import os
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

_PREFIX = "SAM3_"


class Config(BaseModel):
    """Every knob of the service. Defaults work on a laptop with no GPU."""

    model: str = Field(
        "tiny-random", description="`tiny-random`, `full-random` (facebook/sam3's architecture, random weights: for "
        "benchmarks), a Hugging Face model id (`facebook/sam3` is gated: accept the licence, set HF_TOKEN), or a "
        "`save_pretrained` directory."
    )
    models: str = Field(
        "", description="Several models at once, chosen per request: comma-separated `name=source` pairs, each source "
        "anything SAM3_MODEL takes, or `tiny-random:<seed>` (tiny-random with other weights), or `tiny-random-lite` "
        "(a tiny sam3_lite_text model: concept prompts only). Empty: SAM3_MODEL alone, named `sam3` "
        "(docs/models.md)."
    )
    default_model: str = Field("", description="The model a request that names none gets (empty: the first of "
                               "SAM3_MODELS).")
    models_per_replica: int = Field(
        2, ge=1, description="Models one encoder or decoder replica holds at once (Serve model multiplexing); the "
        "least recently used is unloaded to load another."
    )
    device: str = Field("auto", description="`auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:1`...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="`auto` picks bfloat16 on CUDA and float32 on CPU."
    )
    host: str = Field(
        "127.0.0.1", description="Address the HTTP proxy binds. With SAM3_API_KEYS empty, `sam3-serve` binds loopback "
        "only (another address is ignored with a warning)."
    )
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP proxy.")

    # Image limits
    max_image_bytes: int = Field(
        20 * 1024 * 1024, ge=1024, description="Largest encoded image (base64-decoded or fetched)."
    )
    max_image_pixels: int = Field(40_000_000, ge=4, description="Largest decoded image (width × height), checked "
        "from the header before decoding (decompression bombs).")
    min_image_side: int = Field(2, ge=1, description="Smallest accepted width or height.")
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest HTTP request body.")
    ingress_max_inflight_bytes: int = Field(
        1024 * 1024 * 1024, ge=1024, description="Request bodies one ingress replica holds at once, all requests "
        "together; past it a request gets 429 with Retry-After (a lone request is always let in, up to its own limit)."
    )

    # Video limits (checked from the container header before decoding where it declares them)
    video_max_bytes: int = Field(200 * 1024 * 1024, ge=1024, description="Largest encoded video accepted.")
    video_max_frames: int = Field(10_000, ge=1, description="Most frames decoded from one video; decoding "
        "stops at the first frame over it.")
    video_max_duration_s: float = Field(600.0, gt=0, description="Longest video accepted, in seconds (from the "
        "container header and from frame timestamps).")
    video_max_frame_pixels: int = Field(4_000_000, ge=4, description="Largest video frame (width × height).")
    video_max_side: int = Field(4096, ge=2, description="Largest video frame width or height.")
    video_max_decoded_bytes: int = Field(
        512 * 1024**2, ge=1024,
        description="Decoded RGB frames (frames × H × W × 3) one session holds in memory; a longer video is re-read "
        "from its container as it is tracked; a list of image frames over it stays encoded and is decoded as read.",
    )
    video_frame_cache_bytes: int = Field(
        256 * 1024**2, ge=1024,
        description="Decoded frames a video re-read from its container (or kept encoded) keeps cached."
    )

    # URL fetching
    fetch_timeout_s: float = Field(10.0, gt=0, description="Deadline of one client-supplied URL fetch, all hops.")
    fetch_max_redirects: int = Field(3, ge=0, description="Redirects followed per URL fetch, each hop re-checked.")
    url_allowlist: list[str] = Field(
        default_factory=list,
        description="Hosts, IPs or CIDRs that may be fetched even though they are private/loopback.",
    )

    # Segmentation defaults and caps
    max_prompts: int = Field(16, ge=1, description="Prompts in one request.")
    max_instances: int = Field(100, ge=1, description="Upper bound on instances returned per prompt "
        "(caps a request's `max_instances`).")
    max_points: int = Field(64, ge=1, description="Clicks in one prompt.")
    max_boxes: int = Field(64, ge=1, description="Boxes in one prompt.")

    # Caches (one ImageCache replica owns them; every ingress replica reads them)
    embedding_cache_entries: int = Field(64, ge=0, description="Image embeddings kept by the one ImageCache "
        "replica (every ingress replica finds them), keyed by (API key, `image_id` or image digest); 0 disables.")
    embedding_cache_bytes: int = Field(2 * 1024**3, ge=0, description="Byte bound of the embedding cache.")
    logits_cache_entries: int = Field(1024, ge=0, description="Images whose low-res visual-prompt logits are "
        "kept for refinement (Roboflow `save_logits_to_cache`).")
    logits_cache_bytes: int = Field(512 * 1024**2, ge=0, description="Byte bound of the logits cache.")

    # Generated files (edited images and masks served back by URL, in the shared state store)
    media_max_bytes: int = Field(
        256 * 1024**2, ge=1024, description="Byte bound of the shared media store (Oxen's edited images and masks, "
        "finished jobs' files); the oldest files go first."
    )
    media_ttl_s: float = Field(3600.0, gt=0, description="Seconds a generated file's URL stays valid.")

    # Video sessions
    video_max_sessions: int = Field(8, ge=1, description="Open video sessions at once (over it: 429); "
        "live streams count apart (SAM3_VIDEO_MAX_STREAMS).")
    video_session_ttl_s: float = Field(600.0, gt=0, description="A session idle this long is closed and its actor "
        "freed.")
    video_num_gpus: float = Field(0.0, ge=0, description="GPU fraction of each session's tracker actor.")
    video_warm_sessions: int = Field(
        1, ge=0, description="Tracker actors kept started with the model loaded, so opening a session costs only "
        "its decode (0 disables); refilled in the background after each open; never more than the places left under "
        "SAM3_VIDEO_MAX_SESSIONS; each waiting actor holds SAM3_VIDEO_NUM_GPUS and a model copy.",
    )
    video_max_objects: int = Field(32, ge=1, description="Objects one session may track.")

    # Live video streams (WebSocket /v1/video/streams, docs/video-streams.md)
    video_max_streams: int = Field(4, ge=1, description="Live streams open at once (over it: "
        "close code 4429); each holds a tracker actor like a session (SAM3_VIDEO_NUM_GPUS too).")
    video_stream_max_in_flight: int = Field(
        2, ge=1, description="Frames of one stream queued or being tracked at once; a frame pushed beyond it is "
        "dropped and answered `dropped`."
    )
    video_stream_max_frame_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest encoded frame (one binary WebSocket message) of a stream; a "
        "larger one is answered with a `payload_too_large` error (frames also obey SAM3_VIDEO_MAX_FRAME_PIXELS and "
        "SAM3_VIDEO_MAX_SIDE)."
    )
    video_stream_idle_s: float = Field(
        60.0, gt=0, description="A stream that gets no message this long is closed (close code 4504)."
    )

    # Async queue (Oxen /api/ai/queue, /api/events): one JobStore, JobRunner replicas run the jobs
    jobs_max: int = Field(10_000, ge=1, description="Job records held (all keys); "
        "the oldest finished ones are dropped first, then 429.")
    jobs_max_queued_per_key: int = Field(32, ge=1, description="Queued + running jobs of one API key (over it: 429).")
    jobs_ttl_s: float = Field(3600.0, gt=0, description="Seconds a finished job (and its events) is kept.")
    jobs_timeout_s: float = Field(1800.0, gt=0, description="Longest a job may run before it is failed "
        "(`timeout`).")
    jobs_heartbeat_timeout_s: float = Field(
        15.0, gt=0, description="A running job whose worker sent no heartbeat for this long is failed (`worker_died`); "
        "workers beat every fifth of it."
    )
    jobs_concurrency: int = Field(2, ge=1, description="Jobs one JobRunner replica runs at once.")
    jobs_runner_replicas: int = Field(1, ge=1, description="JobRunner replicas.")
    jobs_events_replay_s: float = Field(
        300.0, ge=0, description="A new /api/events connection first replays the caller's events this recent."
    )
    jobs_sse_ping_s: float = Field(15.0, gt=0, description="Seconds between `: ping` keep-alives on /api/events.")

    # Serve graph
    encoder_max_batch_size: int = Field(8, ge=1, description="Most images per encoder forward.")
    encoder_batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="Longest a batch waits for requests its senders have in flight (a request alone "
        "never waits; requests that arrive while the encoder runs form the next batch without waiting).",
    )
    encoder_num_gpus: float = Field(0.0, ge=0, description="GPU fraction per encoder replica (0 on CPU).")
    decoder_num_gpus: float = Field(0.0, ge=0, description="GPU fraction per decoder replica (0 on CPU).")
    decoder_max_batch_size: int = Field(
        8, ge=1, le=64, description="Most requests per decoder batch: requests that wait while the decoder is busy "
        "share one pass of each neck and their DETR and mask-decoder forwards (1: one request at a time).")
    decoder_batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="Longest a decoder batch waits for requests its senders have in flight (a request "
        "alone never waits; requests that arrive while the decoder runs form the next batch without waiting).")
    decoder_prompt_batch: int = Field(
        8, ge=1, le=64,
        description="Most (image, concept prompt) pairs per DETR forward, from one request or several; pairs share a "
        "forward only when their exemplar counts match. Batched forwards round differently from one prompt at a time "
        "(docs/performance.md says by how much); SAM3_DECODER_EXACT=1 keeps the exact path.",
    )
    decoder_visual_batch: int = Field(
        8, ge=1, le=64, description="Most visual prompts (clicks, boxes) per mask-decoder forward, from one request "
        "or several; prompts share a forward only when their point count, box, and multimask match.")
    decoder_exact: bool = Field(
        False, description="One request and one prompt per forward: every result bit for bit what transformers gives "
        "for that prompt alone (SAM3_DECODER_MAX_BATCH_SIZE, _PROMPT_BATCH and _VISUAL_BATCH are then 1).")
    num_cpus: float = Field(0.0, ge=0, description="CPUs reserved per replica (0 keeps Ray from waiting on CPUs).")
    model_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources each ImageEncoder and Decoder replica needs, as JSON: "
        "`{\"model_node\": 0.01}` keeps them on nodes started with `--resources '{\"model_node\": 1}'` "
        "(docs/cluster.md).",
    )
    service_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources each CPU-side replica (Ingress, ImageCache, VideoSessions, JobStore, "
        "JobRunner, WebUI) needs, as JSON: `{\"service_node\": 0.01}` keeps them off the model nodes, so a model "
        "node's death costs no ingress (docs/cluster.md).",
    )
    encoder_replicas: int = Field(1, ge=1, description="ImageEncoder replicas (without autoscaling).")
    decoder_replicas: int = Field(1, ge=1, description="Decoder replicas (without autoscaling).")
    ingress_replicas: int = Field(1, ge=1, description="Ingress replicas (without autoscaling).")
    web_ui: bool = Field(True, description="Serve the web UI at /ui (a WebUI replica holding the Gradio app).")
    autoscale: bool = Field(False, description="Use Ray Serve autoscaling "
        "(1 to SAM3_AUTOSCALE_MAX_REPLICAS replicas of the ingress, encoder and decoder) instead of fixed counts.")
    autoscale_max_replicas: int = Field(4, ge=1, description="Most replicas per deployment when autoscaling.")
    autoscale_target_ongoing_requests: float = Field(
        4.0, gt=0, description="Ongoing requests per replica that autoscaling aims for (more: add replicas)."
    )
    autoscale_upscale_delay_s: float = Field(
        30.0, ge=0, description="Load must stay high this long before a replica is added."
    )
    autoscale_downscale_delay_s: float = Field(
        600.0, ge=0, description="Load must stay low this long before a replica is removed."
    )
    autoscale_look_back_period_s: float = Field(
        30.0, gt=0, description="Window over which the autoscaler averages each deployment's ongoing requests."
    )
    request_timeout_s: float = Field(
        120.0, gt=0, description="Every request's deadline: the longest it may take, waiting included. A client may "
        "shorten it with the header `X-Request-Timeout: <seconds>`; past it the work is dropped wherever it is (504)."
    )
    decoder_threads: int = Field(
        2, ge=1, le=64, description="Decoder batches one Decoder replica runs at once (worker threads); requests past "
        "them wait on the replica for the next batch, where an expired or cancelled one is dropped before it starts."
    )

    # Admission and overload (docs/operations.md): what the ingress lets into the model graph
    admission_running_per_replica: int = Field(
        8, ge=1, description="Image model requests admitted at once per model replica (the encoder and decoder "
        "replicas, the fewer of the two; under SAM3_AUTOSCALE one more while they are below the maximum, so that the "
        "autoscaler sees the demand), split evenly over the ingress replicas; the rest wait in a fair line."
    )
    admission_max_wait_s: float = Field(
        0.5, ge=0, description="Longest estimated wait in the admission line; a request that would wait longer, "
        "or could not be served before its deadline, is refused at once with 503 and Retry-After (0: no line)."
    )
    max_inflight_per_key: int = Field(
        32, ge=1, description="Image model requests one API key may have in flight (running or waiting) per "
        "ingress replica; past it: 429 with Retry-After. With auth off all traffic is one key."
    )
    shutdown_grace_s: float = Field(
        5.0, ge=0, le=300, description="On stop (Ctrl-C, SIGTERM, a redeploy or downscale), seconds a replica "
        "gets to finish the requests it is serving; `make serve` exits within this plus about 2 s."
    )
    failover_retries: int = Field(
        3, ge=0, le=20, description="Times an idempotent request (in Serve's proxy, when its ingress replica dies) "
        "or model call (encode, decode, cache lookups) is re-sent when the replica serving it dies, within the "
        "request's deadline; each retry goes to a live replica or waits for the replacement (0: a death answers "
        "503 at once)."
    )
    video_session_max_calls: int = Field(
        4, ge=1, description="Calls (prompts, propagations, resets) one video session runs or queues at once; "
        "past it: 429 with Retry-After."
    )

    # Logs (docs/operations.md, "Request ids and logs")
    log_format: Literal["text", "json"] = Field(
        "text", description="`text` (Serve's own line format) or `json`: one JSON object per line (asctime, "
        "levelname, name, message, request_id in a request, deployment and replica) from `make serve`'s driver, "
        "every replica, and Serve's proxy and controller where `make serve` starts them."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Lowest level logged by the service's loggers and Serve's, in the driver and every replica."
    )

    # Shared state (docs/architecture.md says what lives where)
    state_dir: str = Field(
        ".sam3-state", description="Directory of the embedded SQLite state file (media, jobs, sessions) when "
        "SAM3_STATE_URL is empty; every replica on this machine shares it and it survives restarts."
    )
    state_url: str = Field(
        "", description="`redis://host:6379/0` for clusters (every node shares it), `sqlite:////abs/path.db`, or "
        "`memory://` (one process only: tests). Empty: SQLite under SAM3_STATE_DIR."
    )

    # Auth
    api_keys: list[str] = Field(default_factory=list, description="Accepted API keys; empty disables auth.")

    @field_validator("state_url")
    @classmethod
    def _known_state_url(cls, value: str) -> str:
        scheme = value.partition("://")[0] if "://" in value else value
        if value and scheme not in ("redis", "rediss", "unix", "sqlite", "memory"):
            raise ValueError("use redis://host:port/db, sqlite:////path/state.db or memory://")
        return value

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _any_case(cls, value: object, info) -> object:
        if isinstance(value, str):
            return value.strip().upper() if info.field_name == "log_level" else value.strip().lower()
        return value

    @field_validator("model_resources", "service_resources", mode="before")
    @classmethod
    def _parse_json(cls, value: object) -> object:
        if isinstance(value, str):
            return json.loads(value) if value.strip() else {}
        return value

    @field_validator("url_allowlist", "api_keys", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @model_validator(mode="after")
    def _registry(self) -> Config:
        from serve_app.core.registry import Registry, RegistryError

        try:
            Registry.from_config(self)
        except RegistryError as exc:
            raise ValueError(str(exc)) from None
        return self

    def decoder_batches(self) -> tuple[int, int, int]:
        """(requests per decoder batch, concept pairs per DETR forward, visual prompts per mask-decoder forward)."""
        if self.decoder_exact:
            return 1, 1, 1
        return self.decoder_max_batch_size, self.decoder_prompt_batch, self.decoder_visual_batch

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Config:
        """Read every `SAM3_<FIELD>` variable; explicit overrides win. Raises ValueError with a readable message."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name in cls.model_fields:
            raw = env.get(_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = raw
        values.update(overrides)
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{_PREFIX}{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
            )
            raise ValueError(f"invalid configuration: {problems}") from None


# The knobs by topic: docs/configuration.md's table and `sam3-serve --help` group them so (a test checks that every
# field is in exactly one topic).
TOPICS: dict[str, tuple[str, ...]] = {
    "Model and device": ("model", "models", "default_model", "models_per_replica", "device", "dtype"),
    "HTTP, auth and deadlines": ("host", "port", "api_keys", "request_timeout_s", "max_request_bytes",
                                 "ingress_max_inflight_bytes"),
    "Admission, overload and failures": ("admission_running_per_replica", "admission_max_wait_s",
                                         "max_inflight_per_key", "decoder_threads", "video_session_max_calls",
                                         "failover_retries", "shutdown_grace_s"),
    "Images": ("max_image_bytes", "max_image_pixels", "min_image_side"),
    "Fetching URLs": ("fetch_timeout_s", "fetch_max_redirects", "url_allowlist"),
    "Prompts": ("max_prompts", "max_instances", "max_points", "max_boxes"),
    "Caches and generated files": ("embedding_cache_entries", "embedding_cache_bytes", "logits_cache_entries",
                                   "logits_cache_bytes", "media_max_bytes", "media_ttl_s"),
    "Shared state store": ("state_dir", "state_url"),
    "Video": ("video_max_bytes", "video_max_frames", "video_max_duration_s", "video_max_frame_pixels",
              "video_max_side", "video_max_decoded_bytes", "video_frame_cache_bytes", "video_max_sessions",
              "video_session_ttl_s", "video_num_gpus", "video_warm_sessions", "video_max_objects"),
    "Live video streams": ("video_max_streams", "video_stream_max_in_flight", "video_stream_max_frame_bytes",
                           "video_stream_idle_s"),
    "Async queue (Oxen /api/ai/queue, /api/events)": (
        "jobs_max", "jobs_max_queued_per_key", "jobs_ttl_s", "jobs_timeout_s", "jobs_heartbeat_timeout_s",
        "jobs_concurrency", "jobs_runner_replicas", "jobs_events_replay_s", "jobs_sse_ping_s"),
    "Logs": ("log_format", "log_level"),
    "Graph: batching, replicas, GPUs": (
        "encoder_max_batch_size", "encoder_batch_wait_timeout_s", "encoder_num_gpus", "decoder_num_gpus",
        "decoder_max_batch_size", "decoder_batch_wait_timeout_s", "decoder_prompt_batch", "decoder_visual_batch",
        "decoder_exact", "num_cpus", "model_resources", "service_resources", "encoder_replicas",
        "decoder_replicas", "ingress_replicas", "web_ui", "autoscale", "autoscale_max_replicas",
        "autoscale_target_ongoing_requests", "autoscale_upscale_delay_s", "autoscale_downscale_delay_s",
        "autoscale_look_back_period_s"),
}


def default_text(field) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, list):
        return ",".join(value) or "(empty)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value) if value != "" else "(empty)"


def knob_table() -> str:
    """The Markdown tables of every knob by topic (docs/configuration.md holds them verbatim; a test keeps the two
    equal). Each knob is an environment variable, a `sam3-serve` flag and a `--config` file key."""
    out: list[str] = []
    for topic, fields in TOPICS.items():
        out += [f"### {topic}", "", "| variable | flag | default | what |", "|---|---|---|---|"]
        for name in fields:
            field = Config.model_fields[name]
            description = (field.description or "").replace("|", "\\|")
            flag = "--" + name.replace("_", "-") + ("` / `--no-" + name.replace("_", "-") if field.annotation is bool
                                                     else "")
            out.append(f"| `{_PREFIX}{name.upper()}` | `{flag}` | `{default_text(field)}` | {description} |")
        out.append("")
    return "\n".join(out).rstrip("\n")


if __name__ == "__main__":  # `python -m serve_app.core.config` prints the table for the docs
    print(knob_table())
