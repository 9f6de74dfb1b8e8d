"""`sam3-serve`: the service's command line (argparse).

    sam3-serve [serve] [--config FILE.yaml] [--KNOB VALUE ...]   start the service (what `make serve` starts)
    sam3-serve config  [--config FILE.yaml] [--KNOB VALUE ...]   print the effective configuration, keys redacted
    sam3-serve build   [--config FILE.yaml] [--KNOB VALUE ...]   write a Serve config YAML (`serve run`, `serve deploy`)
    sam3-serve batch   images|videos ...                         offline batch inference (`sam3-batch`)

Every `SAM3_*` knob (serve_app/core/config.py) is a flag of the same name in lower case with dashes
(`SAM3_MAX_IMAGE_BYTES` is `--max-image-bytes`), and a key of the `--config` YAML file (`max_image_bytes`, or the
variable's own name). Precedence, lowest first: the default, the environment, the file, the flag. This module
imports only the configuration: `--help`, `config` and `build` load no model and start no Ray.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from serve_app.core.config import _PREFIX, TOPICS, Config, default_text

COMMANDS = ("serve", "config", "build", "batch")
REDACTED = "<redacted>"
APP_NAME = "sam3"
IMPORT_PATH = "deployments.app:app_builder"
HTTP_FIELDS = ("host", "port")  # Serve's http_options in a built file; request_timeout_s goes there too (and in args)
SECRET_FIELDS = ("api_keys",)

EXAMPLES = """commands:
  serve     start the service (the default: `sam3-serve --port 8011` is `sam3-serve serve --port 8011`)
  config    print the effective configuration (each value's source; API keys and passwords redacted)
  build     write a Serve config YAML for `serve run` / `serve deploy` (-o FILE; stdout by default)
  batch     offline batch inference with Ray Data: `sam3-serve batch images|videos ...` (= sam3-batch)

examples:
  sam3-serve --port 8011 --model tiny-random
  SAM3_API_KEYS=k1 sam3-serve --host 0.0.0.0 --config prod.yaml
  sam3-serve config --config prod.yaml --encoder-replicas 2
  sam3-serve build --model facebook/sam3 --encoder-num-gpus 0.5 -o serve_config.yaml && serve run serve_config.yaml

Every SAM3_* environment variable is also a flag (lower case, dashes) and a key of --config FILE.yaml; a flag wins
over the file, the file over the environment. docs/configuration.md describes each knob.
"""


class CliError(Exception):
    """A configuration problem the user can fix: printed as one line, exit status 2."""


def flag_of(field: str) -> str:
    return "--" + field.replace("_", "-")


def _knob_help(field: str) -> str:
    info = Config.model_fields[field]
    text = f"{info.description or ''} ({_PREFIX}{field.upper()}; default: {default_text(info)})"
    return text.replace("%", "%%")  # argparse formats help strings with %


def _metavar(field: str, annotation: object) -> str:
    kind = str(annotation)
    if "dict" in kind:
        return "JSON"
    if "list" in kind:
        return "A,B"
    if annotation is int:
        return "N"
    if annotation is float:
        return "SECONDS" if field.endswith("_s") else "X"
    return field.rsplit("_", 1)[-1].upper()


USAGE = "sam3-serve [serve|config|build|batch] [--config FILE.yaml] [--KNOB VALUE ...]"


def _knob_parser() -> argparse.ArgumentParser:
    """The flags every command but batch shares: one per Config field, plus --config. Absent flags set nothing
    (argparse.SUPPRESS), so a value given before the command and one given after it merge."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                        help="a YAML mapping of knob names (max_image_bytes or SAM3_MAX_IMAGE_BYTES) to values")
    for topic, fields in TOPICS.items():  # --help lists the knobs by topic, as docs/configuration.md does
        group = parser.add_argument_group(f"knobs: {topic}")
        for field in fields:
            info = Config.model_fields[field]
            if info.annotation is bool:
                group.add_argument(flag_of(field), dest=field, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=_knob_help(field))
            else:
                group.add_argument(flag_of(field), dest=field, metavar=_metavar(field, info.annotation),
                                   default=argparse.SUPPRESS, help=_knob_help(field))
    return parser


def build_parser() -> argparse.ArgumentParser:
    knobs = _knob_parser()
    parser = argparse.ArgumentParser(
        prog="sam3-serve", usage=USAGE, parents=[knobs], epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A production model server for Meta's Segment Anything 3 on Ray Serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{serve,config,build,batch}")
    sub.add_parser("serve", parents=[knobs], usage="sam3-serve serve [--config FILE.yaml] [--KNOB VALUE ...]",
                   help="start the service (the default command)",
                   description="Start Ray, Serve's HTTP proxy on --host:--port and the graph; Ctrl-C stops it.")
    config = sub.add_parser("config", parents=[knobs], help="print the effective configuration, keys redacted",
                            usage="sam3-serve config [--format yaml|json] [--config FILE.yaml] [--KNOB VALUE ...]")
    config.add_argument("--format", choices=("yaml", "json"), default="yaml",
                        help="yaml: every knob with its source as a comment (default); json: the values only")
    build = sub.add_parser("build", parents=[knobs], help="write a Serve config YAML (serve run / serve deploy)",
                           usage="sam3-serve build [-o FILE] [--include-secrets] [--config FILE.yaml] [--KNOB ...]")
    build.add_argument("-o", "--output", metavar="FILE", help="where to write it (default: stdout)")
    build.add_argument("--include-secrets", action="store_true",
                       help="write API keys (and a state URL's password) into the file; by default they are left "
                       "to SAM3_API_KEYS / SAM3_STATE_URL on the cluster")
    sub.add_parser("batch", add_help=False, help="offline batch inference with Ray Data (sam3-batch's arguments)")
    return parser


def _field_of(key: str) -> str | None:
    name = key.strip().lower().replace("-", "_")
    if name.startswith(_PREFIX.lower()):
        name = name[len(_PREFIX):]
    return name if name in Config.model_fields else None


def read_config_file(path: str) -> dict[str, Any]:
    """The --config file: a YAML mapping of knob names to values; an unknown key is an error naming the closest."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CliError(f"--config {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CliError(f"--config {path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CliError(f"--config {path}: expected a mapping of knob names to values, got {type(data).__name__}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        field = _field_of(str(key))
        if field is None:
            close = difflib.get_close_matches(str(key).lower().replace("-", "_"), list(Config.model_fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise CliError(f"--config {path}: unknown knob {key!r}{hint}")
        values[field] = value
    return values


def _check_not_redacted(values: dict[str, Any], where: str) -> None:
    """A file written by `sam3-serve config` names keys as <redacted>: reading one back must not serve with them."""
    for field in SECRET_FIELDS + ("state_url",):
        value = values.get(field)
        items = value if isinstance(value, list) else [value]
        if any(isinstance(item, str) and REDACTED in item for item in items):
            raise CliError(f"{where}: {field} is {REDACTED} (printed by `sam3-serve config`): set the real value, "
                           f"or leave it out and set {_PREFIX}{field.upper()}")


def resolve(args: argparse.Namespace, environ: dict[str, str] | None = None) -> tuple[Config, dict[str, str]]:
    """The effective Config and, per field, where its value came from: default, env, file or flag."""
    import os

    env = dict(os.environ if environ is None else environ)
    file_values = read_config_file(args.config) if getattr(args, "config", None) else {}
    flag_values = {field: getattr(args, field) for field in Config.model_fields if hasattr(args, field)}
    _check_not_redacted(file_values, f"--config {getattr(args, 'config', '')}")
    _check_not_redacted(flag_values, "flags")
    sources = {field: "default" for field in Config.model_fields}
    for field in Config.model_fields:
        if env.get(_PREFIX + field.upper()):
            sources[field] = "env"
    sources.update({field: "file" for field in file_values})
    sources.update({field: "flag" for field in flag_values})
    try:
        config = Config.from_env(env, **{**file_values, **flag_values})
    except ValueError as exc:
        cause = exc.__cause__ or exc.__context__
        raise CliError(_explain(cause, sources, args) if isinstance(cause, ValidationError) else str(exc)) from None
    return config, sources


def _explain(error: ValidationError, sources: dict[str, str], args: argparse.Namespace) -> str:
    problems = []
    for err in error.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        where = {"flag": flag_of(field), "file": f"{field} in {getattr(args, 'config', '')}",
                 "env": f"{_PREFIX}{field.upper()}"}.get(sources.get(field, ""), field)
        problems.append(f"{where}: {err['msg']}")
    return "invalid configuration: " + "; ".join(problems)


def redact_url(url: str) -> str:
    """redis://user:secret@host:6379/0 -> redis://user:<redacted>@host:6379/0; redis://secret@host (Redis' bare
    password) and a `password=` query value likewise. A URL without a password is returned unchanged."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{REDACTED}@{host}" if colon else f"{REDACTED}@{host}"
    query = parts.query
    if "password" in query.lower():
        query = urlencode([(k, REDACTED if k.lower() == "password" else v) for k, v in parse_qsl(query)], safe="<>")
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # nothing secret (urlunsplit would also rewrite sqlite:////abs/path as sqlite://abs/path)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redacted(config: Config) -> dict[str, Any]:
    values = config.model_dump(mode="json")
    values["api_keys"] = [REDACTED] * len(config.api_keys)
    values["state_url"] = redact_url(config.state_url)
    return values


def render_config(config: Config, sources: dict[str, str], fmt: str = "yaml") -> str:
    values = redacted(config)
    if fmt == "json":
        return json.dumps(values, indent=2)
    lines = ["# sam3-serve's effective configuration (sources: default < env < file < flag); keys redacted"]
    for field, value in values.items():
        dumped = yaml.safe_dump({field: value}, default_flow_style=True, width=1 << 20).strip()
        lines.append(f"{dumped[1:-1] if dumped.startswith('{') else dumped}  # {sources[field]}")
    return "\n".join(lines) + "\n"


def serve_config(config: Config, include_secrets: bool = False) -> dict[str, Any]:
    """A Serve config (ServeDeploySchema) running this configuration: `import_path` is deployments.app:app_builder
    and `args` every knob that differs from its default; Serve's http_options take the host, port and deadline."""
    defaults = Config()
    values = config.model_dump(mode="json")
    args = {field: value for field, value in values.items()
            if field not in HTTP_FIELDS and (value != getattr(defaults, field) if field != "model" else True)}
    if not include_secrets:
        args.pop("api_keys", None)
        if config.state_url and redact_url(config.state_url) != config.state_url:
            args.pop("state_url", None)
    from serve_app.core.logs import serve_logging_config

    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": config.host, "port": config.port, "request_timeout_s": config.request_timeout_s},
        # the proxy's and the controller's lines (the replicas' follow log_format and log_level in args)
        "logging_config": serve_logging_config(config.log_format, config.log_level),
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "args": args}],
    }


def render_build(config: Config, include_secrets: bool = False) -> str:
    notes = ["# Written by `sam3-serve build`: `serve run FILE` on one machine, `serve deploy FILE` against a cluster,",
             "# or the serveConfigV2 of a KubeRay RayService. `args` are the knobs that differ from their defaults",
             "# (docs/configuration.md); they override the SAM3_* environment variables of the cluster."]
    if not include_secrets:
        notes.append("# API keys (and a state URL with a password) are not written: set SAM3_API_KEYS / SAM3_STATE_URL "
                     "on the cluster.")
    if config.host not in ("127.0.0.1", "localhost", "::1") and not (include_secrets and config.api_keys):
        notes.append(f"# http_options.host is {config.host}: Serve binds it as given, so give the cluster API keys.")
    notes.append("# Serve's proxy resends requests of a dead ingress replica only with "
                 "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.core.failover:proxy_middlewares set before Ray "
                 "starts (docs/operations.md).")
    body = yaml.safe_dump(serve_config(config, include_secrets), sort_keys=False, width=120)
    return "\n".join(notes) + "\n" + body


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["batch"]:
        from serve_app.batch.cli import main as batch_main

        return batch_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command or "serve"
    try:
        config, sources = resolve(args)
    except CliError as exc:
        print(f"sam3-serve: {exc}", file=sys.stderr)
        return 2
    if command == "config":
        sys.stdout.write(render_config(config, sources, args.format))
        return 0
    if command == "build":
        text = render_build(config, args.include_secrets)
        if args.output:
            Path(args.output).write_text(text)
            print(f"wrote {args.output}: serve run {args.output}", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return 0
    from serve_app.main import serve

    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
