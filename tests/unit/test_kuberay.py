"""cluster/rayservice.yaml and cluster/rayjob-batch.yaml: KubeRay's CRD schema, Ray's Serve schema, Kubernetes' pod schema.

Three independent checks of each manifest, and a broken copy of each that every relevant check must reject:
- the whole RayService / RayJob against the openAPIV3Schema of KubeRay's CRD (tests/data/kuberay/, version in
  its README), made strict as `kubectl apply --validate=strict` is: an unknown field is an error, not pruned;
- each `serveConfigV2` with `ray.serve.schema.ServeDeploySchema`, and its args through our own app builder;
- each pod template (head, every worker group, and plain Deployments) with `kubernetes-validate`, strict.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.app import app_builder

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
CRDS = ROOT / "tests" / "data" / "kuberay"
K8S_VERSION = "1.32.0"  # the oldest Kubernetes the manifests are meant for (GKE/EKS regular channels)
SCHEMAS = {"RayService": "rayservice.schema.json", "RayJob": "rayjob.schema.json"}
MANIFESTS = ["rayservice.yaml", "rayjob-batch.yaml"]


def _strict(schema: object) -> object:
    """Objects with declared properties reject others (as the API server does under --validate=strict)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def _crd_validator(kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((CRDS / SCHEMAS[kind]).read_text())
    schema.pop("$comment", None)
    return jsonschema.Draft7Validator(_strict(schema))


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def _ray_resources(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["apiVersion"] == "ray.io/v1"]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterConfig" if doc["kind"] == "RayService" else "rayClusterSpec"]


def _pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    found = []
    for doc in docs:
        if doc["apiVersion"] == "ray.io/v1":
            spec = _cluster_spec(doc)
            found.append((f"{doc['metadata']['name']}/head", spec["headGroupSpec"]["template"]))
            found += [(f"{doc['metadata']['name']}/{g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]]
        elif doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            found.append((doc["metadata"]["name"], doc["spec"]["template"]))
    return found


def crd_errors(docs: list[dict]) -> list[str]:
    errors = []
    for doc in _ray_resources(docs):
        for err in _crd_validator(doc["kind"]).iter_errors(doc):
            errors.append(f"{doc['kind']} {'/'.join(map(str, err.absolute_path))}: {err.message[:200]}")
    return errors


def k8s_errors(docs: list[dict]) -> list[str]:
    """Every pod template as a core/v1 PodTemplate, and every non-Ray resource as itself."""
    errors = []
    subjects = [(name, {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": t})
                for name, t in _pod_templates(docs)]
    subjects += [(d["metadata"]["name"], d) for d in docs if d["apiVersion"] != "ray.io/v1"]
    for name, resource in subjects:
        try:
            kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{name}: {exc.message[:200]}")
    return errors


def serve_errors(docs: list[dict]) -> list[str]:
    errors = []
    for doc in _ray_resources(docs):
        if "serveConfigV2" not in doc["spec"]:
            continue
        try:
            schema = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
            for application in schema.applications:
                app_builder({**application.args, "model": "tiny-random"})  # our own Config must accept the args
        except Exception as exc:  # noqa: BLE001 - pydantic and our ValueError alike
            errors.append(f"{doc['metadata']['name']}: {str(exc)[:300]}")
    return errors


def test_crd_schemas_are_the_named_kuberay_version():
    readme = (CRDS / "README.md").read_text()
    for name in SCHEMAS.values():
        assert "KubeRay v1.7.0" in json.loads((CRDS / name).read_text())["$comment"]
        assert name in readme
    assert "v1.7.0" in readme


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_matches_kuberay_crd(name):
    docs = _docs(name)
    assert _ray_resources(docs), f"{name} holds no ray.io/v1 resource"
    assert crd_errors(docs) == []


@pytest.mark.parametrize("name", MANIFESTS)
def test_pod_templates_are_valid_kubernetes(name):
    assert len(_pod_templates(_docs(name))) >= 2
    assert k8s_errors(_docs(name)) == []


def test_rayservice_serve_config_is_valid_and_is_the_gpu_layout():
    docs = _docs("rayservice.yaml")
    assert serve_errors(docs) == []
    (service,) = _ray_resources(docs)
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    gpu = yaml.safe_load((CLUSTER / "serve_config_gpu.yaml").read_text())["applications"][0]["args"]
    for knob in ("encoder_num_gpus", "decoder_num_gpus", "encoder_max_batch_size", "autoscale"):
        assert args[knob] == gpu[knob], knob
    assert args["encoder_num_gpus"] + args["decoder_num_gpus"] + args["video_num_gpus"] <= 1.0
    assert args["state_url"].startswith("redis://")
    spec = service["spec"]["rayClusterConfig"]
    assert spec["gcsFaultToleranceOptions"]["redisAddress"]
    assert "nvidia.com/gpu" not in json.dumps(spec["headGroupSpec"])  # a CPU head
    (worker,) = spec["workerGroupSpecs"]
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    # the worker group offers the custom resource the model deployments ask for
    offered = json.loads(json.loads(worker["rayStartParams"]["resources"]))
    assert set(args["model_resources"]) <= set(offered)
    # and the builder really asks for it on the model deployments (only there)
    graph, stack = {}, [app_builder({**args, "model": "tiny-random"})._bound_deployment]
    while stack:
        node = stack.pop()
        graph[node.name] = node.ray_actor_options
        stack.extend(a._bound_deployment for a in node.init_args if hasattr(a, "_bound_deployment"))
    assert graph["ImageEncoder"]["resources"] == graph["Decoder"]["resources"] == args["model_resources"]
    assert not graph["Ingress"].get("resources")


def test_rayjob_entrypoint_and_runtime_env_parse():
    (job,) = _ray_resources(_docs("rayjob-batch.yaml"))
    assert job["spec"]["entrypoint"].startswith("sam3-batch ")
    assert isinstance(yaml.safe_load(job["spec"]["runtimeEnvYAML"]), dict)


# ---- the checks catch breakage: each broken copy fails the check that owns that part ----------------------


def _break_crd_unknown_field(docs):
    _ray_resources(docs)[0]["spec"]["serveConfigV3"] = "typo"


def _break_crd_type(docs):
    _cluster_spec(_ray_resources(docs)[0])["workerGroupSpecs"][0]["replicas"] = "two"


def _break_crd_missing_required(docs):
    del _cluster_spec(_ray_resources(docs)[0])["headGroupSpec"]


def _break_pod_container_field(docs):
    _cluster_spec(_ray_resources(docs)[0])["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["gpus"] = 1


def _break_pod_missing_image_name(docs):
    del _cluster_spec(_ray_resources(docs)[0])["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]


def _break_serve_import_path(docs):
    cfg = yaml.safe_load(docs[-1]["spec"]["serveConfigV2"])
    cfg["applications"][0]["import_path"] = "app_builder"  # no module: not an import path
    docs[-1]["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)


def _break_serve_bad_arg(docs):
    cfg = yaml.safe_load(docs[-1]["spec"]["serveConfigV2"])
    cfg["applications"][0]["args"]["encoder_num_gpus"] = -1
    docs[-1]["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)


BREAKAGES = [
    ("rayservice.yaml", _break_crd_unknown_field, crd_errors),
    ("rayservice.yaml", _break_crd_type, crd_errors),
    ("rayservice.yaml", _break_crd_missing_required, crd_errors),
    ("rayjob-batch.yaml", _break_crd_unknown_field, crd_errors),
    ("rayjob-batch.yaml", _break_crd_type, crd_errors),
    ("rayservice.yaml", _break_pod_container_field, k8s_errors),
    ("rayservice.yaml", _break_pod_missing_image_name, k8s_errors),
    ("rayjob-batch.yaml", _break_pod_container_field, k8s_errors),
    ("rayservice.yaml", _break_serve_import_path, serve_errors),
    ("rayservice.yaml", _break_serve_bad_arg, serve_errors),
]


@pytest.mark.parametrize(("name", "breaks", "check"), BREAKAGES,
                         ids=[f"{n}-{b.__name__.removeprefix('_break_')}" for n, b, _ in BREAKAGES])
def test_broken_copy_is_rejected(name, breaks, check, tmp_path):
    docs = _docs(name)
    assert check(docs) == []
    broken = copy.deepcopy(docs)
    breaks(broken)
    copy_path = tmp_path / name  # a broken copy on disk, re-read as the real file is
    copy_path.write_text(yaml.safe_dump_all(broken))
    assert check([d for d in yaml.safe_load_all(copy_path.read_text()) if d]) != []


def test_every_ray_container_runs_with_the_allocator_settings():
    """Ray processes inherit the pod's environment: without these, large bodies are never given back (core/stats)."""
    from serve_app.core.stats import ALLOCATOR_ENV

    templates = _pod_templates(_ray_resources(_docs("rayservice.yaml")))
    assert templates
    for where, template in templates:
        for container in template["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert {k: env.get(k) for k in ALLOCATOR_ENV} == ALLOCATOR_ENV, (where, container["name"])


def test_every_ray_container_loads_the_proxy_failover_middleware():
    """Each node runs a Serve proxy: each must re-send what a dead ingress replica did not answer (core/failover)."""
    from serve_app.core.failover import PROXY_CALLBACK

    for where, template in _pod_templates(_ray_resources(_docs("rayservice.yaml"))):
        for container in template["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH") == PROXY_CALLBACK, (where, container["name"])
