"""`sam3-serve` (serve_app/cli.py): every knob a flag, flag > file > environment, `config` redacts, `build` writes a
Serve config that Serve's own schema accepts and that builds the same configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serve_app import cli
from serve_app.core.config import Config

ROOT = Path(__file__).resolve().parents[2]


def resolve(argv: list[str], environ: dict[str, str] | None = None) -> tuple[Config, dict[str, str]]:
    return cli.resolve(cli.build_parser().parse_args(argv), environ or {})


def test_every_knob_is_a_flag_and_the_defaults_round_trip():
    argv: list[str] = []
    for field, info in Config.model_fields.items():
        default = info.get_default(call_default_factory=True)
        if isinstance(default, bool):
            argv.append(cli.flag_of(field) if default else "--no-" + field.replace("_", "-"))
            continue
        text = ",".join(default) if isinstance(default, list) else json.dumps(default) if isinstance(default, dict) \
            else str(default)
        argv += [cli.flag_of(field), text]
    config, sources = resolve(argv)
    assert config == Config()
    assert set(sources.values()) == {"flag"}, "every field must have been set by its flag"


def test_flag_beats_file_beats_environment(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("port: 8100\nSAM3_MAX_PROMPTS: 4\nencoder-replicas: 3\nweb_ui: false\napi_keys: [a, b]\n")
    env = {"SAM3_PORT": "8200", "SAM3_MAX_PROMPTS": "5", "SAM3_MAX_BOXES": "7", "SAM3_ENCODER_REPLICAS": "2"}
    config, sources = resolve(["--config", str(path), "--port", "8011", "--model", "tiny-random"], env)
    assert (config.port, sources["port"]) == (8011, "flag")
    assert (config.max_prompts, sources["max_prompts"]) == (4, "file")
    assert (config.encoder_replicas, sources["encoder_replicas"]) == (3, "file")
    assert (config.max_boxes, sources["max_boxes"]) == (7, "env")
    assert (config.web_ui, config.api_keys) == (False, ["a", "b"])
    assert sources["max_points"] == "default"
    # the flag given before the command and after it merge
    config, _ = resolve(["--port", "8012", "serve", "--max-points", "3"])
    assert (config.port, config.max_points) == (8012, 3)


def test_bad_values_name_where_they_came_from(tmp_path):
    with pytest.raises(cli.CliError, match=r"--port: .*less than or equal to 65535"):
        resolve(["--port", "70000"])
    with pytest.raises(cli.CliError, match=r"SAM3_MAX_PROMPTS: .*integer"):
        resolve([], {"SAM3_MAX_PROMPTS": "many"})
    path = tmp_path / "c.yaml"
    path.write_text("max_prompt: 3\n")
    with pytest.raises(cli.CliError, match=r"unknown knob 'max_prompt' \(did you mean max_prompts\?\)"):
        resolve(["--config", str(path)])
    path.write_text("- a\n- b\n")
    with pytest.raises(cli.CliError, match="expected a mapping"):
        resolve(["--config", str(path)])
    path.write_text("port: [\n")
    with pytest.raises(cli.CliError, match="not valid YAML"):
        resolve(["--config", str(path)])
    path.write_text("max_prompts: 0\n")
    with pytest.raises(cli.CliError, match=r"max_prompts in .*c.yaml: .*greater than or equal to 1"):
        resolve(["--config", str(path)])
    with pytest.raises(cli.CliError, match="No such file"):
        resolve(["--config", str(tmp_path / "absent.yaml")])


def test_config_redacts_keys_and_passwords_and_a_redacted_file_is_refused(tmp_path, capsys):
    env = {"SAM3_API_KEYS": "sekrit-1,sekrit-2", "SAM3_STATE_URL": "redis://:hunter2@redis.internal:6379/0"}
    config, sources = resolve(["--port", "8011"], env)
    text = cli.render_config(config, sources)
    assert "sekrit" not in text and "hunter2" not in text
    assert "api_keys: [<redacted>, <redacted>]  # env" in text
    assert "state_url: 'redis://:<redacted>@redis.internal:6379/0'  # env" in text
    assert "port: 8011  # flag" in text
    as_json = json.loads(cli.render_config(config, sources, "json"))
    assert as_json["api_keys"] == ["<redacted>"] * 2 and as_json["port"] == 8011
    # what `config` printed, read back as a --config file, must not start a service with "<redacted>" as its key
    path = tmp_path / "printed.yaml"
    path.write_text(text)
    with pytest.raises(cli.CliError, match="api_keys is <redacted>"):
        resolve(["--config", str(path)])
    assert cli.main(["config", "--max-boxes", "9"]) == 0
    assert "max_boxes: 9  # flag" in capsys.readouterr().out


@pytest.mark.parametrize("url, expected", [
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("redis://u:pw@h/1", "redis://u:<redacted>@h/1"),
    ("redis://pw@h", "redis://<redacted>@h"),
    ("rediss://h/0?password=x&db=1", "rediss://h/0?password=<redacted>&db=1"),
    ("sqlite:////var/lib/sam3/state.db", "sqlite:////var/lib/sam3/state.db"),
    ("memory://", "memory://"),
])
def test_redact_url(url, expected):
    assert cli.redact_url(url) == expected


def test_build_writes_a_serve_config_serve_accepts_and_it_builds_the_same_configuration(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from deployments.app import app_builder

    out = tmp_path / "serve_config.yaml"
    env = {"SAM3_API_KEYS": "sekrit", "SAM3_MAX_PROMPTS": "4"}
    args = cli.build_parser().parse_args(["build", "-o", str(out), "--encoder-replicas", "2", "--port", "8123",
                                          "--url-allowlist", "10.0.0.0/8,example.org", "--no-web-ui",
                                          "--model-resources", '{"model_node": 0.01}'])
    config, _ = cli.resolve(args, env)
    out.write_text(cli.render_build(config))
    data = yaml.safe_load(out.read_text())
    schema = ServeDeploySchema.parse_obj(data)  # what `serve run FILE` and `serve deploy FILE` validate with
    app = schema.applications[0]
    assert (app.import_path, app.route_prefix, schema.http_options.port) == ("deployments.app:app_builder", "/", 8123)
    assert "sekrit" not in out.read_text() and "api_keys" not in app.args
    # the cluster's environment supplies the keys; args supply the rest: the same Config as the command line's
    rebuilt = Config.from_env({"SAM3_API_KEYS": "sekrit"}, **app.args)
    assert rebuilt.model_dump(exclude={"host", "port"}) == config.model_dump(exclude={"host", "port"})
    assert app.args == {"model": "tiny-random", "max_prompts": 4, "url_allowlist": ["10.0.0.0/8", "example.org"],
                        "model_resources": {"model_node": 0.01}, "encoder_replicas": 2, "web_ui": False}
    assert app_builder(app.args) is not None  # binds the graph from the file's args, as `serve run` would
    assert schema.logging_config.encoding == "TEXT"
    as_json = ServeDeploySchema.parse_obj(yaml.safe_load(cli.render_build(config.model_copy(
        update={"log_format": "json", "log_level": "DEBUG"}))))
    assert (as_json.logging_config.encoding, as_json.logging_config.log_level) == ("JSON", "DEBUG")
    assert as_json.applications[0].args["log_format"] == "json"  # the replicas' own, through app_builder
    with_secrets = yaml.safe_load(cli.render_build(config, include_secrets=True))
    assert with_secrets["applications"][0]["args"]["api_keys"] == ["sekrit"]


def test_config_and_build_import_neither_torch_nor_ray():
    code = ("import sys; from serve_app import cli; rc = cli.main(['config']) + cli.main(['build']); "
            "assert rc == 0; print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("[]"), result.stdout[-300:]


def test_batch_is_sam3_batch(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["batch", "images", "--help"])
    assert exit_info.value.code == 0
    assert "--output" in capsys.readouterr().out


def test_make_serve_runs_the_console_script():
    makefile = (ROOT / "Makefile").read_text()
    serve_rule = makefile.split("\nserve:", 1)[1].split("\n\n", 1)[0]
    assert "$(VENV)/bin/sam3-serve" in serve_rule
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'sam3-serve = "serve_app.cli:main"' in pyproject
