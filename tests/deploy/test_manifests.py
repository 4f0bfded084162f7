"""deploy/kubernetes: every manifest is valid for a fixed Kubernetes version, and they agree with each
other and with the image (port, user, environment variables).

Validation: kubernetes-validate (the API's own OpenAPI schemas), strict (unknown fields fail), for
Kubernetes K8S_VERSION. The kustomizations are rendered here by `render` (resources, images and
JSON 6902 patches: what they use), and, where kubectl is installed, checked against
`kubectl kustomize`. KServe's InferenceService is a custom resource that kubernetes-validate has no
schema for: its own structure is checked against KSERVE_SCHEMA (the fields we use), and the Pod
parts of its predictor (containers, volumes, securityContext) are validated as a core/v1 Pod.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from snapserve.server.settings import ServerSettings, env_name

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.33.0"  # the oldest Kubernetes the manifests claim: gRPC probes need >= 1.27
IMAGE_UID = 10001  # the Dockerfile's USER

Resource = dict[str, Any]


def load_docs(path: Path) -> list[Resource]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# ------------------------------------------------------------------------------------ rendering
def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _parent(doc: Any, parts: list[str]) -> Any:
    for part in parts[:-1]:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def json_patch(doc: Resource, ops: list[dict[str, Any]]) -> Resource:
    """RFC 6902, the operations the overlays use: test, add, replace, remove."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op["path"])
        parent, key = _parent(doc, parts), parts[-1]
        index: int | str = (len(parent) if key == "-" else int(key)) if isinstance(parent, list) else key
        if op["op"] == "test":
            assert parent[index] == op["value"], f"patch test failed at {op['path']}"
        elif op["op"] == "add" and isinstance(parent, list):
            parent.insert(int(index), copy.deepcopy(op["value"]))
        elif op["op"] in ("add", "replace"):
            if op["op"] == "replace":
                parent[index]  # noqa: B018 (replace needs an existing target)
            parent[index] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del parent[index]
        else:
            raise AssertionError(f"unsupported patch op {op['op']!r}")
    return doc


def _matches(resource: Resource, target: dict[str, str]) -> bool:
    group, _, version = resource["apiVersion"].rpartition("/")
    return all(want == have for want, have in [
        (target.get("kind"), resource["kind"]), (target.get("name"), resource["metadata"]["name"]),
        (target.get("group"), group), (target.get("version"), version)] if want is not None)


def _set_images(resource: Resource, images: list[dict[str, str]]) -> None:
    pod = resource.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        name = container["image"].split(":")[0]
        for image in images:
            if image["name"] == name:
                container["image"] = f"{image.get('newName', name)}:{image['newTag']}"


def render(directory: Path) -> list[Resource]:
    """The resources `kubectl kustomize directory` builds, for the features our files use."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "images", "patches"}
    assert not unsupported, f"render() does not know {unsupported}: teach it, or keep it simple"
    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        resources += render(path) if path.is_dir() else load_docs(path)
    for patch in kustomization.get("patches", []):
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        matched = [i for i, r in enumerate(resources) if _matches(r, patch["target"])]
        assert matched, f"patch {patch['path']} matches no resource"
        for i in matched:
            resources[i] = json_patch(resources[i], ops)
    for resource in resources:
        _set_images(resource, kustomization.get("images", []))
    return resources


def by_kind(resources: list[Resource], kind: str) -> list[Resource]:
    return [r for r in resources if r["kind"] == kind]


def key(resource: Resource) -> tuple[str, str]:
    return resource["kind"], resource["metadata"]["name"]


RENDERED = {"cpu": KUBE, "gpu": KUBE / "gpu"}
PLAIN_FILES = sorted(p for p in (KUBE / "base").glob("*.yaml") if p.name != "kustomization.yaml")


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("path", PLAIN_FILES, ids=lambda p: p.name)
def test_base_manifest_is_valid(path: Path) -> None:
    for doc in load_docs(path):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("variant", RENDERED)
def test_rendered_variant_is_valid(variant: str) -> None:
    resources = render(RENDERED[variant])
    assert {kind for kind, _ in map(key, resources)} == {
        "PersistentVolumeClaim", "Deployment", "Service", "HorizontalPodAutoscaler",
        "PodDisruptionBudget"}
    for resource in resources:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def test_every_yaml_file_is_used() -> None:
    """A manifest that no kustomization lists (and not kserve/, applied by itself) is dead."""
    listed = {KUBE / "kserve" / "inferenceservice.yaml"}
    for kustomization in KUBE.rglob("kustomization.yaml"):
        listed.add(kustomization)
        spec = yaml.safe_load(kustomization.read_text())
        listed |= {(kustomization.parent / e).resolve() for e in spec.get("resources", [])}
        listed |= {(kustomization.parent / p["path"]).resolve() for p in spec.get("patches", [])}
    assert set(KUBE.rglob("*.yaml")) <= listed


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: render() "
                    "alone stands for `kubectl kustomize` (test_rendered_variant_is_valid)")
@pytest.mark.parametrize("variant", RENDERED)
def test_render_matches_kubectl_kustomize(variant: str) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(RENDERED[variant])], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    theirs = sorted(yaml.safe_load_all(out), key=key)
    assert theirs == sorted(render(RENDERED[variant]), key=key)


# ------------------------------------------------------------------------------------ consistency
def server_container(deployment: Resource) -> Resource:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def env(container: Resource) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def known_env_vars() -> set[str]:
    return {env_name(key) for key in ServerSettings.model_fields} | {"SNAPSERVE_CONFIG"}


@pytest.mark.parametrize("variant", RENDERED)
def test_deployment_probes_port_and_user_agree_with_the_image(variant: str) -> None:
    resources = render(RENDERED[variant])
    (deployment,) = by_kind(resources, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(deployment)
    variables = env(container)
    assert set(variables) <= known_env_vars(), "a SNAPSERVE_* variable the server does not read"
    port = int(variables["SNAPSERVE_PORT"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["ports"][0]["containerPort"] == ports["grpc"] == port
    # Metrics on: their port declared, and the scrape annotations point at it.
    metrics_port = int(variables["SNAPSERVE_METRICS_PORT"])
    assert ports["metrics"] == metrics_port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"
    # HTTP probes on the REST port: ready to start and to take traffic, live to stay.
    assert ports["http"] == int(variables["SNAPSERVE_HTTP_PORT"])
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # The model repository: the PVC, read-only, where SNAPSERVE_MODEL_REPOSITORY points.
    (pvc,) = by_kind(resources, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == variables[
        "SNAPSERVE_MODEL_REPOSITORY"])
    assert mount["readOnly"] is True
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    # Services and the PDB select these pods, and point at this port; the HPA scales this Deployment.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for service in by_kind(resources, "Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["grpc", "http"]
    (pdb,) = by_kind(resources, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (hpa,) = by_kind(resources, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "cpu" in container["resources"]["requests"], "the HPA's utilization needs a CPU request"


def test_gpu_variant_asks_for_a_gpu_and_the_gpu_image() -> None:
    (cpu,) = by_kind(render(RENDERED["cpu"]), "Deployment")
    (gpu,) = by_kind(render(RENDERED["gpu"]), "Deployment")
    assert env(server_container(cpu))["SNAPSERVE_DEVICE"] == "cpu"
    assert env(server_container(gpu))["SNAPSERVE_DEVICE"] == "cuda"
    assert "nvidia.com/gpu" not in server_container(cpu)["resources"]["limits"]
    assert server_container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server_container(gpu)["image"].endswith("-gpu")
    assert not server_container(cpu)["image"].endswith("-gpu")
    assert server_container(cpu)["image"].rpartition(":")[0] == \
        server_container(gpu)["image"].rpartition(":")[0]


def test_headless_service_for_client_side_balancing() -> None:
    services = {s["metadata"]["name"]: s for s in by_kind(render(KUBE), "Service")}
    assert services["snapserve-headless"]["spec"]["clusterIP"] == "None"
    assert services["snapserve"]["spec"]["type"] == "ClusterIP"


# ------------------------------------------------------------------------------------ KServe
KSERVE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$"},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {"type": "object", "required": ["predictor"], "additionalProperties": False,
                 "properties": {"predictor": {
                     "type": "object", "required": ["containers"],
                     "properties": {
                         "minReplicas": {"type": "integer", "minimum": 0},
                         "maxReplicas": {"type": "integer", "minimum": 1},
                         "containers": {"type": "array", "minItems": 1, "items": {
                             "type": "object", "required": ["name", "image"]}}}}}},
    },
}
# Predictor fields that are KServe's own; the rest of the predictor is a core/v1 PodSpec.
KSERVE_PREDICTOR_FIELDS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric",
                           "containerConcurrency", "timeout", "canaryTrafficPercent", "logger",
                           "batcher", "labels", "annotations", "deploymentStrategy"}


def test_kserve_inference_service() -> None:
    (isvc,) = load_docs(KUBE / "kserve" / "inferenceservice.yaml")
    jsonschema.validate(isvc, KSERVE_SCHEMA)
    predictor = isvc["spec"]["predictor"]
    assert predictor["minReplicas"] <= predictor["maxReplicas"]
    pod_spec = {k: v for k, v in predictor.items() if k not in KSERVE_PREDICTOR_FIELDS}
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                                  "spec": pod_spec}, K8S_VERSION, strict=True)
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    variables = env(container)
    assert set(variables) <= known_env_vars()
    port = int(variables["SNAPSERVE_PORT"])
    # gRPC first, named h2c: how KServe/Knative know it speaks gRPC (HTTP/2 cleartext); REST
    # declared beside it.
    assert container["ports"] == [{"name": "h2c", "containerPort": port, "protocol": "TCP"},
                                  {"name": "http", "containerPort": int(variables["SNAPSERVE_HTTP_PORT"]),
                                   "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": port, "service": ""}, probe
    assert pod_spec["securityContext"]["runAsUser"] == IMAGE_UID
    (deployment,) = by_kind(render(KUBE), "Deployment")
    assert container["image"] == server_container(deployment)["image"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod_spec["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {by_kind(render(KUBE), "PersistentVolumeClaim")[0]["metadata"]["name"]}
