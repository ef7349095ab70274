"""deploy/kubernetes/: the kustomize overlays render to objects that the Kubernetes schemas
accept (kubernetes-validate, offline: it ships the schemas), and that keep blindinfer's
promises: the image by digest, arguments that blindinfer's own parser accepts, probes on
routes the server has, no privilege, resource limits, several replicas, and init-data whose
agent policy pins the same image, arguments, user, PATH and mounts as the Deployment.

Rendering: no kustomize binary at test time, so `_render` implements the subset of
kustomize the overlays use (resources, and RFC 6902 JSON patches with a target) and refuses
any other kustomization key, so a file that used more would fail here rather than render
differently from `kubectl apply -k`.
"""

from __future__ import annotations

import argparse
import base64
import copy
import gzip
import hashlib
import importlib
import importlib.util
import json
import pkgutil
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest
import yaml

from blindinfer.cli.main import build_parser

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "deploy" / "kubernetes"
OVERLAYS = {"snp": "kata-qemu-snp", "tdx": "kata-qemu-tdx"}
# The oldest Kubernetes minor still commonly run, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
DIGEST_REF = re.compile(r"[a-z0-9][a-z0-9._:/-]*[a-z0-9]@sha256:[0-9a-f]{64}")
INIT_DATA_ANNOTATION = "io.katacontainers.config.hypervisor.cc_init_data"


def _initdata_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("initdata", KUBE / "initdata.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


initdata = _initdata_module()


# --- a kustomize subset ------------------------------------------------------------------

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches"}


def _render(directory: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    unknown = set(kustomization) - KUSTOMIZATION_KEYS
    assert not unknown, f"{directory}: kustomization uses {unknown}, which _render lacks"
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(_render(path))
        else:
            objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"path", "target"}, patch
        operations = yaml.safe_load((directory / patch["path"]).read_text())
        targets = [obj for obj in objects if _matches(obj, patch["target"])]
        assert len(targets) == 1, f"patch {patch['path']} matches {len(targets)} objects"
        for operation in operations:
            _apply(targets[0], operation)
    return objects


def _matches(obj: dict[str, Any], target: dict[str, str]) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    wanted = {
        "group": group,
        "version": version,
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
    }
    return all(wanted[key] == value for key, value in target.items())


def _apply(document: dict[str, Any], operation: dict[str, Any]) -> None:
    """One RFC 6902 operation: add, replace or remove (the only ones the overlays use)."""
    op, pointer = operation["op"], operation["path"]
    *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in pointer.split("/")[1:]]
    node: Any = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if op == "add":
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), operation["value"])
        else:
            node[last] = operation["value"]
    elif op == "replace":
        if isinstance(node, list):
            node[int(last)] = operation["value"]
        else:
            assert last in node, f"replace of missing {pointer}"
            node[last] = operation["value"]
    elif op == "remove":
        del node[int(last) if isinstance(node, list) else last]
    else:
        raise AssertionError(f"JSON patch op {op!r} is not supported by _render")


def _rendered(tee: str) -> list[dict[str, Any]]:
    return _render(KUBE / "overlays" / tee)


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def _pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(objects, "Deployment")["spec"]["template"]


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = _pod(objects)["spec"]["containers"]
    assert len(containers) == 1, "one container: the agent policy allows one workload"
    return containers[0]


def _arg(args: list[str], option: str) -> str:
    assert args.count(option) == 1, f"{option} given {args.count(option)} times"
    return args[args.index(option) + 1]


def _policy(tee: str) -> tuple[dict[str, Any], str]:
    """The init-data document carried by the rendered Deployment, and its policy text."""
    annotations = _pod(_rendered(tee))["metadata"]["annotations"]
    text = initdata.decode(annotations[INIT_DATA_ANNOTATION])
    document = tomllib.loads(text)
    return document, document["data"]["policy.rego"]


def _rego_value(policy: str, name: str) -> Any:
    """A constant of the policy, written as JSON on one line (`name := <json>`)."""
    found = re.findall(rf"^{name} := (.+)$", policy, re.MULTILINE)
    assert len(found) == 1, f"policy defines {name} {len(found)} times"
    return json.loads(found[0])


# --- the rendered objects ----------------------------------------------------------------


def test_the_base_is_complete_and_the_overlays_set_the_runtime_class() -> None:
    kinds = sorted(obj["kind"] for obj in _render(KUBE / "base"))
    assert kinds == ["Deployment", "PersistentVolumeClaim", "PodDisruptionBudget", "Service"]
    base_pod = _pod(_render(KUBE / "base"))
    assert "runtimeClassName" not in base_pod["spec"]  # only an overlay is ever applied
    for tee, runtime_class in OVERLAYS.items():
        assert _pod(_rendered(tee))["spec"]["runtimeClassName"] == runtime_class


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("tee", sorted(OVERLAYS))
def test_every_object_validates_against_the_kubernetes_schema(tee: str, version: str) -> None:
    for obj in _rendered(tee):
        # strict: unknown fields are errors too (a typo would otherwise be dropped silently)
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_catches_a_broken_object() -> None:
    """The check above has teeth: a misspelt field and a wrong type are refused."""
    deployment = copy.deepcopy(_one(_rendered("snp"), "Deployment"))
    deployment["spec"]["replica"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    deployment = copy.deepcopy(_one(_rendered("snp"), "Deployment"))
    deployment["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("tee", sorted(OVERLAYS))
def test_the_image_is_pinned_by_digest(tee: str) -> None:
    pod = _pod(_rendered(tee))["spec"]
    for container in pod["containers"] + pod.get("initContainers", []):
        assert DIGEST_REF.fullmatch(container["image"]), container["image"]


@pytest.mark.parametrize("tee", sorted(OVERLAYS))
def test_the_arguments_parse_with_the_real_serve_parser(tee: str, tmp_path: Path) -> None:
    container = _container(_rendered(tee))
    assert container["command"] == ["/usr/local/bin/python3", "-I", "-m", "blindinfer.cli.main"]
    args = list(container["args"])
    assert args[0] == "serve"
    # --auth-file must exist when parsed; it lives in the image, so stand in for it here.
    auth_file = _arg(args, "--auth-file")
    assert auth_file.startswith("/")
    stand_in = tmp_path / "auth.toml"
    stand_in.write_text("")
    args[args.index("--auth-file") + 1] = str(stand_in)

    parsed = build_parser().parse_args(args)

    assert isinstance(parsed, argparse.Namespace)
    assert parsed.command == "serve"
    assert parsed.host == "0.0.0.0"
    assert parsed.port == int(container["ports"][0]["containerPort"]) == 9924
    # evidence from the attestation agent: a Kata container has no configfs-tsm
    assert parsed.platform == f"coco-{tee}"
    assert parsed.aa_url == "http://127.0.0.1:8006"
    annotations = _pod(_rendered(tee))["metadata"]["annotations"]
    kernel_params = annotations["io.katacontainers.config.hypervisor.kernel_params"].split()
    assert "agent.guest_components_rest_api=all" in kernel_params  # serves /aa/evidence
    assert not parsed.simulation
    assert parsed.store_dir == "/var/lib/blindinfer/store"
    assert str(parsed.store_key_resource) == "kbs:///blindinfer/store-key/1"
    assert parsed.cdh_url.rstrip("/") == "http://127.0.0.1:8006"
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert parsed.store_dir in mounts
    if tee == "snp":
        assert parsed.kds_url == "https://kdsintf.amd.com"
    else:
        assert parsed.pccs_url.startswith("https://")


def _server_routes() -> dict[str, set[str]]:
    """Every route of the server's application (blindinfer.server.routes.*), path → methods."""
    package = importlib.import_module("blindinfer.server.routes")
    paths: dict[str, set[str]] = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for route in getattr(module, "routes", []):
            paths.setdefault(route.path, set()).update(route.methods or ())
    return paths


@pytest.mark.parametrize("tee", sorted(OVERLAYS))
def test_the_probes_reach_real_routes_over_https(tee: str) -> None:
    container = _container(_rendered(tee))
    routes = _server_routes()
    port_names = {port["name"] for port in container["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["scheme"] == "HTTPS"  # the server speaks TLS only
        assert get["port"] in port_names
        assert "GET" in routes.get(get["path"], set()), get["path"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


@pytest.mark.parametrize("tee", sorted(OVERLAYS))
def test_no_privilege_and_no_host_access(tee: str) -> None:
    pod = _pod(_rendered(tee))["spec"]
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key, False)
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    for volume in pod["volumes"]:
        assert "hostPath" not in volume
        if "emptyDir" in volume:  # disk-backed emptyDir would live on the host
            assert volume["emptyDir"]["medium"] == "Memory"
    container = _container(_rendered(tee))
    context = container["securityContext"]
    assert context["privileged"] is False
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]
    assert "add" not in context["capabilities"]
    # the one variable: each replica's audit-log name, from its own pod name, never a
    # value the host chooses per pod through a ConfigMap or Secret
    assert "envFrom" not in container
    assert container["env"] == [
        {
            "name": "BLINDINFER_REPLICA_ID",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
        }
    ]


@pytest.mark.parametrize("tee", sorted(OVERLAYS))
def test_resources_replicas_service_store_and_disruption_budget(tee: str) -> None:
    objects = _rendered(tee)
    deployment = _one(objects, "Deployment")
    resources = _container(objects)["resources"]
    for kind in ("requests", "limits"):
        assert set(resources[kind]) >= {"cpu", "memory"}
    replicas = deployment["spec"]["replicas"]
    assert replicas >= 2
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()

    service = _one(objects, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["protocol"] == "TCP"  # passthrough: TLS ends in the pods
    assert port["targetPort"] in {p["name"] for p in _container(objects)["ports"]}

    budget = _one(objects, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= budget["spec"]["minAvailable"] < replicas

    claim = _one(objects, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    claimed = [
        volume["persistentVolumeClaim"]["claimName"]
        for volume in deployment["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in volume
    ]
    assert claimed == [claim["metadata"]["name"]]


# --- init-data and the agent policy ------------------------------------------------------


@pytest.mark.parametrize("tee", sorted(OVERLAYS))
def test_init_data_is_the_overlays_toml_and_up_to_date(tee: str) -> None:
    overlay = KUBE / "overlays" / tee
    annotation = _pod(_rendered(tee))["metadata"]["annotations"][INIT_DATA_ANNOTATION]
    assert initdata.decode(annotation) == (overlay / "initdata.toml").read_text()
    assert initdata.sync(overlay, check=True)  # `initdata.py sync` would change nothing
    document, _ = _policy(tee)
    assert document["version"] == "0.1.0"
    assert set(document["data"]) == {"aa.toml", "cdh.toml", "policy.rego"}
    aa = tomllib.loads(document["data"]["aa.toml"])
    cdh = tomllib.loads(document["data"]["cdh.toml"])
    assert cdh["kbc"]["name"] == "cc_kbc"
    assert aa["token_configs"]["kbs"]["url"] == cdh["kbc"]["url"]


@pytest.mark.parametrize("tee", sorted(OVERLAYS))
def test_the_agent_policy_pins_the_deployments_image_and_arguments(tee: str) -> None:
    objects = _rendered(tee)
    container = _container(objects)
    _, policy = _policy(tee)
    assert policy.lstrip().startswith("#") and "\npackage agent_policy\n" in policy
    assert _rego_value(policy, "blindinfer_image") == container["image"]
    assert _rego_value(policy, "blindinfer_args") == container["command"] + container["args"]
    pod_context = _pod(objects)["spec"]["securityContext"]
    assert _rego_value(policy, "blindinfer_uid") == pod_context["runAsUser"]
    for mount in container["volumeMounts"]:
        assert f'"destination": "{mount["mountPath"]}"' in policy
    # no variable that reaches code or configuration: the loader's, Python's, blindinfer's
    (names,) = re.findall(r"^harmless_env_names := \{(.+)\}$", policy, re.MULTILINE)
    for name in re.findall(r'"([^"]+)"', names):
        assert not name.startswith(("LD_", "PYTHONPATH", "PYTHONHOME", "BLINDINFER", "ORT_"))
    # the host may not exec into the pod, replace the policy or write into the container
    for request in ("ExecProcessRequest", "SetPolicyRequest", "WriteStreamRequest"):
        assert f"default {request} := false" in policy
    assert "default CreateContainerRequest := false" in policy


def test_the_containerfile_matches_the_deployment_and_the_policy() -> None:
    containerfile = (KUBE / "Containerfile").read_text()
    container = _container(_rendered("snp"))
    _, policy = _policy("snp")
    (path,) = re.findall(r"^ENV (PATH=\S+)$", containerfile, re.MULTILINE)
    assert _rego_value(policy, "blindinfer_path") == path
    (entrypoint,) = re.findall(r"^ENTRYPOINT (\[.+\])$", containerfile, re.MULTILINE)
    assert json.loads(entrypoint) == container["command"]
    (user,) = re.findall(r"^USER (\d+):(\d+)$", containerfile, re.MULTILINE)
    security = _pod(_rendered("snp"))["spec"]["securityContext"]
    assert (int(user[0]), int(user[1])) == (security["runAsUser"], security["runAsGroup"])
    auth_file = _arg(container["args"], "--auth-file")
    assert f"COPY deploy/kubernetes/auth.toml {auth_file}\n" in containerfile
    assert "--require-hashes" in containerfile and "deploy/image/requirements.lock" in containerfile


def test_the_kbs_resource_policy_releases_the_servers_store_key_to_this_init_data() -> None:
    """The example resource policy names the resource the server asks for and the init-data
    digests of both overlays, so editing one without the other fails here."""
    rego = (KUBE / "trustee" / "resource-policy.rego").read_text()
    container = _container(_rendered("snp"))
    resource = _arg(container["args"], "--store-key-resource")
    path = _rego_value(rego, "store_key_path")
    assert resource == "kbs:///" + "/".join(path)
    for tee, variable in (("snp", "snp_init_data"), ("tdx", "tdx_init_data")):
        (listed,) = re.findall(rf'^{variable} := \{{"([0-9a-f]+)"\}}$', rego, re.MULTILINE)
        text = (KUBE / "overlays" / tee / "initdata.toml").read_text()
        assert listed == initdata.digest(text, tee).hex()
    assert "default allow := false" in rego


# --- initdata.py -------------------------------------------------------------------------

DOCUMENT = 'version = "0.1.0"\nalgorithm = "sha384"\n\n[data]\n"policy.rego" = "package x"\n'


def test_initdata_encodes_as_kata_decodes_and_digests_per_platform() -> None:
    annotation = initdata.encode(DOCUMENT)
    assert gzip.decompress(base64.b64decode(annotation)).decode() == DOCUMENT
    assert initdata.encode(DOCUMENT) == annotation  # gzip mtime 0: one document, one value
    assert initdata.decode(annotation) == DOCUMENT
    full = hashlib.sha384(DOCUMENT.encode()).digest()
    assert initdata.digest(DOCUMENT, "tdx") == full  # 48 bytes: MRCONFIGID as is
    assert initdata.digest(DOCUMENT, "snp") == full[:32]  # HOST_DATA: cut to 32
    short = DOCUMENT.replace("sha384", "sha256")
    assert initdata.digest(short, "tdx") == hashlib.sha256(short.encode()).digest() + bytes(16)


def _refusals() -> Iterator[tuple[str, str]]:
    yield "not base64 !", "not base64"
    yield base64.b64encode(b"plain text").decode(), "not gzip"
    yield base64.b64encode(gzip.compress(b"\xff\xfe")).decode(), "not UTF-8"
    yield base64.b64encode(gzip.compress(b"version = ")).decode(), "not TOML"
    wrong = DOCUMENT.replace("0.1.0", "0.2.0").encode()
    yield base64.b64encode(gzip.compress(wrong)).decode(), "version must be"
    wrong = DOCUMENT.replace("sha384", "md5").encode()
    yield base64.b64encode(gzip.compress(wrong)).decode(), "algorithm must be"
    wrong = b'version = "0.1.0"\nalgorithm = "sha256"\n[data]\nx = 1\n'
    yield base64.b64encode(gzip.compress(wrong)).decode(), "[data] table of strings"
    bomb = gzip.compress(b" " * (initdata.MAX_TOML_BYTES + 1))
    yield base64.b64encode(bomb).decode(), "larger than"


@pytest.mark.parametrize(("annotation", "message"), list(_refusals()))
def test_initdata_decode_refuses_what_is_not_init_data(annotation: str, message: str) -> None:
    with pytest.raises(initdata.InitDataError, match=re.escape(message)):
        initdata.decode(annotation)


def test_initdata_sync_rewrites_only_the_annotation(tmp_path: Path) -> None:
    (tmp_path / "initdata.toml").write_text(DOCUMENT)
    patch = tmp_path / "deployment-patch.yaml"
    patch.write_text(f"- op: add\n  value:\n    {INIT_DATA_ANNOTATION}: old\n# end\n")
    assert not initdata.sync(tmp_path, check=True)
    assert "old" in patch.read_text()  # --check writes nothing
    assert not initdata.sync(tmp_path)
    expected = (
        f'- op: add\n  value:\n    {INIT_DATA_ANNOTATION}: "{initdata.encode(DOCUMENT)}"\n# end\n'
    )
    assert patch.read_text() == expected
    assert initdata.sync(tmp_path, check=True)
    patch.write_text("- op: add\n")
    with pytest.raises(initdata.InitDataError, match="expected one"):
        initdata.sync(tmp_path)
