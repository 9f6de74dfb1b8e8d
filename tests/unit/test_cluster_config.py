"""The Serve config files in cluster/ are valid for `serve run` / `serve deploy` and build the graph they describe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.app import app_builder

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config_gpu.yaml"])
def test_serve_config_is_valid(name):
    schema = ServeDeploySchema.model_validate(yaml.safe_load((CLUSTER / name).read_text()))
    (application,) = schema.applications
    assert application.import_path == "deployments.app:app_builder"


def _deployments(app) -> dict:
    """Walk the bound graph: name -> deployment options."""
    found, stack = {}, [app._bound_deployment]
    while stack:
        node = stack.pop()
        found[node.name] = node
        stack.extend(a._bound_deployment for a in node.init_args if hasattr(a, "_bound_deployment"))
    return found


def test_builder_applies_gpu_fractions_and_batching():
    args = yaml.safe_load((CLUSTER / "serve_config_gpu.yaml").read_text())["applications"][0]["args"]
    graph = _deployments(app_builder({**args, "model": "tiny-random"}))
    assert set(graph) == {"Ingress", "ImageCache", "ImageEncoder", "Decoder", "VideoSessions", "VideoStreams",
                          "JobStore", "JobRunner", "WebUI"}
    assert graph["ImageEncoder"].ray_actor_options["num_gpus"] == 0.5
    assert graph["Decoder"].ray_actor_options["num_gpus"] == 0.25
    assert graph["ImageEncoder"]._deployment_config.autoscaling_config.max_replicas == 4
    config = graph["ImageEncoder"].init_args[0]
    assert (config.encoder_max_batch_size, config.encoder_batch_wait_timeout_s) == (16, 0.005)


def test_builder_rejects_bad_args():
    with pytest.raises(ValueError, match="SAM3_ENCODER_NUM_GPUS"):
        app_builder({"encoder_num_gpus": -1})


def test_model_and_service_resources_pin_the_two_sides_apart():
    """SAM3_MODEL_RESOURCES goes to the model deployments only, SAM3_SERVICE_RESOURCES to every other one (the
    two-node test, tests/integration/test_two_nodes.py, checks where the replicas then really run)."""
    graph = _deployments(app_builder({"model": "tiny-random", "model_resources": '{"model_node": 0.01}',
                                      "service_resources": {"service_node": 0.01}}))
    for name, node in graph.items():
        expected = {"model_node": 0.01} if name in ("ImageEncoder", "Decoder") else {"service_node": 0.01}
        assert node.ray_actor_options["resources"] == expected, name
    plain = _deployments(app_builder({"model": "tiny-random"}))
    assert all(not node.ray_actor_options.get("resources") for node in plain.values())
