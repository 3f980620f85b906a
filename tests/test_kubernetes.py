"""The Kubernetes manifests in deploy/kubernetes, checked offline (no cluster).

Built-in kinds (Deployment, Secret) are validated with kubernetes-validate, which ships the
Kubernetes JSON schemas; the KEDA kinds are not in those, so they are validated against the part
of KEDA's CRD schema these manifests use (typos and wrong types rejected). Then the manifests are
checked against each other and against the config: every service has a Deployment, every queue a
ScaledObject, and KEDA reads the queue with the same Secret the workers use.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helpers import ROOT

from conveyor.settings.config import load_config

DEPLOY = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]
KEDA_API = "keda.sh/v1alpha1"

# The parts of KEDA's CRD (keda.sh/v1alpha1) that these manifests use, with its types: trigger
# metadata values are strings, replica counts and intervals integers, unknown keys rejected.
_NAME_REF = {"type": "object", "required": ["name"], "additionalProperties": False,
             "properties": {"name": {"type": "string", "minLength": 1}, "kind": {"type": "string"},
                            "apiVersion": {"type": "string"}, "envSourceContainerName": {"type": "string"}}}
_METADATA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "minLength": 1}}}


def _keda_resource(kind: str, spec: dict) -> dict:
    """A KEDA object of `kind`: the envelope every Kubernetes resource has, around its own spec."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": KEDA_API}, "kind": {"const": kind}, "metadata": _METADATA, "spec": spec},
    }


SCALED_OBJECT = _keda_resource("ScaledObject", {
    "type": "object",
    "required": ["scaleTargetRef", "triggers"],
    "additionalProperties": False,
    "properties": {
        "scaleTargetRef": _NAME_REF,
        "pollingInterval": {"type": "integer", "minimum": 1},
        "cooldownPeriod": {"type": "integer", "minimum": 0},
        "initialCooldownPeriod": {"type": "integer", "minimum": 0},
        "idleReplicaCount": {"type": "integer", "minimum": 0},
        "minReplicaCount": {"type": "integer", "minimum": 0},
        "maxReplicaCount": {"type": "integer", "minimum": 1},
        "fallback": {"type": "object", "required": ["failureThreshold", "replicas"]},
        "advanced": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "restoreToOriginalReplicaCount": {"type": "boolean"},
                "horizontalPodAutoscalerConfig": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"name": {"type": "string"}, "behavior": {"type": "object"}},
                },
                "scalingModifiers": {"type": "object"},
            },
        },
        "triggers": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["type", "metadata"],
                "additionalProperties": False,
                "properties": {
                    "type": {"type": "string"},
                    "name": {"type": "string"},
                    "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                    "authenticationRef": _NAME_REF,
                    "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                    "useCachedMetrics": {"type": "boolean"},
                },
            },
        },
    },
})
TRIGGER_AUTHENTICATION = _keda_resource("TriggerAuthentication", {
    "type": "object",
    "properties": {
        "secretTargetRef": {
            "type": "array",
            "items": {
                "type": "object", "required": ["parameter", "name", "key"], "additionalProperties": False,
                "properties": {k: {"type": "string", "minLength": 1} for k in ("parameter", "name", "key")},
            },
        },
    },
})
KEDA_SCHEMAS = {"ScaledObject": SCALED_OBJECT, "TriggerAuthentication": TRIGGER_AUTHENTICATION}


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kustomization() -> dict:
    return yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())


def _resources() -> list[dict]:
    """Everything `kubectl apply -k deploy/kubernetes` would apply."""
    return [doc for name in _kustomization()["resources"] for doc in _documents(DEPLOY / name)]


def _of_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in _resources() if doc["kind"] == kind}


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def _validate_keda(doc: dict) -> None:
    jsonschema.validate(doc, KEDA_SCHEMAS[doc["kind"]])


# --- schemas ---------------------------------------------------------------------------------
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_resources_match_the_kubernetes_schemas(version: str) -> None:
    examples = [doc for path in DEPLOY.glob("*.example.yaml") for doc in _documents(path)]
    builtin = [doc for doc in _resources() + examples if not doc["apiVersion"].startswith("keda.sh/")]
    assert {doc["kind"] for doc in builtin} == {"Deployment", "Secret"}
    for doc in builtin:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_kubernetes_schemas_catch_a_broken_deployment() -> None:
    """Proof that the validation above has teeth (and works offline): a Deployment without a
    selector, or with a misspelt field, is rejected."""
    deployment = _of_kind("Deployment")["worker-a"]
    no_selector = copy.deepcopy(deployment)
    del no_selector["spec"]["selector"]
    misspelt = copy.deepcopy(deployment)
    _container(misspelt)["resources"]["limitz"] = _container(misspelt)["resources"].pop("limits")
    for broken in (no_selector, misspelt):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_keda_resources_match_the_crd_schema() -> None:
    keda = [doc for doc in _resources() if doc["apiVersion"].startswith("keda.sh/")]
    assert {doc["kind"] for doc in keda} == {"ScaledObject", "TriggerAuthentication"}
    for doc in keda:
        _validate_keda(doc)


def test_the_keda_schema_catches_a_number_where_keda_wants_a_string() -> None:
    scaled = copy.deepcopy(_of_kind("ScaledObject")["worker-a"])
    scaled["spec"]["triggers"][0]["metadata"]["value"] = 20
    with pytest.raises(jsonschema.ValidationError):
        _validate_keda(scaled)
    scaled["spec"]["triggers"][0]["metadata"]["value"] = "20"
    scaled["spec"]["maxReplicas"] = 3  # HPA spelling, not KEDA's
    with pytest.raises(jsonschema.ValidationError):
        _validate_keda(scaled)


# --- the manifests against each other and the config ----------------------------------------
def test_kustomization_applies_every_manifest_but_the_examples() -> None:
    listed = set(_kustomization()["resources"])
    on_disk = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    examples = {name for name in on_disk if name.endswith(".example.yaml")}
    assert listed == on_disk - examples
    assert examples, "the Secret is shipped as an example only"
    assert "Secret" not in {doc["kind"] for doc in _resources()}, "no credentials in what is applied"
    image_names = {entry["name"] for entry in _kustomization()["images"]}
    assert {_container(d)["image"] for d in _of_kind("Deployment").values()} <= image_names


def test_every_service_has_a_safe_deployment() -> None:
    config = load_config(ROOT / "test-config.yml")
    deployments = _of_kind("Deployment")
    assert set(deployments) == {svc.name for svc in config.services}
    for name, deployment in deployments.items():
        spec = deployment["spec"]
        pod = spec["template"]["spec"]
        container = _container(deployment)
        assert "replicas" not in spec, f"{name}: KEDA owns the replica count"
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
        assert pod["terminationGracePeriodSeconds"] > config.stop_grace_s, f"{name}: tasks need time to finish"
        env = _env(container)
        assert env["WORKER_SERVICE"]["value"] == name
        assert "secretKeyRef" in env["BROKER_URL"]["valueFrom"], f"{name}: the broker URL holds a password"
        assert "conveyor.stack.healthcheck" in container["livenessProbe"]["exec"]["command"]
        if container["securityContext"].get("readOnlyRootFilesystem"):
            assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}, "the node file is written to /tmp"


def test_every_queue_scales_its_own_service_on_queue_length() -> None:
    """On what `make autoscale` counts: ready + unacknowledged (the http protocol, not excluding
    unacknowledged), one replica per target_backlog_per_replica, within the service's bounds."""
    config = load_config(ROOT / "test-config.yml")
    scaled = _of_kind("ScaledObject")
    auths = _of_kind("TriggerAuthentication")
    deployments = _of_kind("Deployment")
    covered = set()
    for name, obj in scaled.items():
        spec = obj["spec"]
        target = spec["scaleTargetRef"]["name"]
        assert target in deployments, f"{name} scales {target}, which is not deployed"
        service = config.service(target)
        assert spec.get("minReplicaCount", 0) <= spec["maxReplicaCount"] <= config.limits.max_replicas
        for trigger in spec["triggers"]:
            meta = trigger["metadata"]
            assert trigger["type"] == "rabbitmq"
            assert meta["mode"] == "QueueLength" and int(meta["value"]) == service.target_backlog_per_replica
            # amqp counts ready messages only: busy workers would be scaled down under a backlog.
            assert meta["protocol"] == "http" and meta.get("excludeUnacknowledged", "false") == "false"
            assert spec["minReplicaCount"] == service.min_replicas
            assert spec["maxReplicaCount"] == config.max_replicas_of(service)
            assert meta["queueName"] in service.queues, f"{name} watches {meta['queueName']}, which {target} does not consume"
            assert trigger["authenticationRef"]["name"] in auths
            covered.add(meta["queueName"])
    assert covered == {q for svc in config.services for q in svc.queues}


def test_keda_reads_the_broker_from_the_workers_secret() -> None:
    (auth,) = _of_kind("TriggerAuthentication").values()
    refs = {ref["parameter"]: (ref["name"], ref["key"]) for ref in auth["spec"]["secretTargetRef"]}
    for deployment in _of_kind("Deployment").values():
        ref = _env(_container(deployment))["BROKER_URL"]["valueFrom"]["secretKeyRef"]
        assert refs["host"][0] == ref["name"]  # one Secret: KEDA's URL sits beside the workers'
    (secret,) = _documents(DEPLOY / "secret.example.yaml")
    assert refs["host"] == (secret["metadata"]["name"], "MANAGEMENT_URL")
    assert secret["stringData"]["MANAGEMENT_URL"].startswith("http://")  # what protocol http needs
    assert secret["stringData"]["BROKER_URL"].startswith("amqp://")
