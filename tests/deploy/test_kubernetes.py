"""The Kubernetes manifests in deploy/kubernetes/: they parse, every container is hardened like the systemd units,
and the configs in their ConfigMaps pass the agent's and aggregator's own validation and agree with the mounts.
(No API server here: the schemas are not checked against a cluster.)"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from collector.aggregator.config import AGGREGATOR_EXAMPLE, AggregatorConfig
from collector.config import AgentConfig, check_file, read_toml
from collector.store.urls import sqlite_path

REPO = Path(__file__).resolve().parents[2]
KUBERNETES = REPO / "deploy" / "kubernetes"
AGENT = KUBERNETES / "wattmeter-agent.yaml"
AGGREGATOR = KUBERNETES / "wattmeter-aggregator.yaml"


def documents(path: Path) -> dict[str, dict[str, Any]]:
    """``kind/name`` -> document."""
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
    named = {f"{doc['kind']}/{doc['metadata']['name']}": doc for doc in docs}
    assert len(named) == len(docs), "two documents with one kind and name"
    return named


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {mount["mountPath"]: mount for mount in container["volumeMounts"]}


def volumes(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {volume["name"]: volume for volume in spec["volumes"]}


def mounted_under(path: Path | str, container: dict[str, Any]) -> dict[str, Any]:
    """The mount that holds ``path`` (the longest prefix)."""
    pure = PurePosixPath(str(path))
    holding = [m for p, m in mounts(container).items() if pure == PurePosixPath(p) or PurePosixPath(p) in pure.parents]
    assert holding, f"{path} is on no volume"
    return max(holding, key=lambda m: len(m["mountPath"]))


def assert_hardened(container: dict[str, Any]) -> None:
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context.get("privileged", False) is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert "add" not in context["capabilities"]
    assert "memory" in container["resources"]["limits"]


def config_from(configmap: dict[str, Any], key: str, tmp_path: Path) -> Path:
    path = tmp_path / key
    path.write_text(configmap["data"][key])
    return path


def test_agent_daemonset_is_hardened_with_host_pid_and_read_only_sys(tmp_path: Path) -> None:
    docs = documents(AGENT)
    daemonset = docs["DaemonSet/wattmeter-agent"]
    spec = pod_spec(daemonset)
    assert spec["hostPID"] is True
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (agent,) = spec["containers"]
    assert_hardened(agent)
    assert "nvidia.com/gpu" not in agent["resources"].get("limits", {})  # watching GPUs takes none from the scheduler
    (init,) = spec["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert init["securityContext"]["allowPrivilegeEscalation"] is False

    config_path = config_from(docs["ConfigMap/wattmeter-agent"], "agent.toml", tmp_path)
    assert check_file(config_path) == []
    config = AgentConfig.model_validate(read_toml(config_path))
    sys_mount = mounted_under(config.sources.rapl.root, agent)
    assert sys_mount["readOnly"] is True
    assert volumes(spec)[mounts(agent)[sys_mount["mountPath"]]["name"]]["hostPath"]["path"] == "/sys"
    for writable in (config.api.socket, config.stream.spool_dir):
        mount = mounted_under(writable, agent)
        assert not mount.get("readOnly", False)
        assert "hostPath" in volumes(spec)[mount["name"]]  # outlives the pod: the socket for the node, the spool
        assert mount["mountPath"] in init["command"]  # and handed to the agent's user
    assert config.api.socket_mode == 0o666
    assert config.workloads.proc_root == Path("/proc")
    assert mounted_under("/etc/wattmeter/agent.toml", agent)["readOnly"] is True


def test_aggregator_deployment_and_service(tmp_path: Path) -> None:
    docs = documents(AGGREGATOR)
    deployment = docs["Deployment/wattmeter-aggregator"]
    spec = pod_spec(deployment)
    assert spec["securityContext"]["runAsNonRoot"] is True
    (aggregator,) = spec["containers"]
    assert_hardened(aggregator)
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"

    config_path = config_from(docs["ConfigMap/wattmeter-aggregator"], "aggregator.toml", tmp_path)
    assert check_file(config_path, AggregatorConfig, AGGREGATOR_EXAMPLE) == []
    config = AggregatorConfig.model_validate(read_toml(config_path))
    database = mounted_under(sqlite_path(config.storage.url), aggregator)
    assert "persistentVolumeClaim" in volumes(spec)[database["name"]]
    assert config.grpc.tls_cert is not None
    assert mounted_under(config.grpc.tls_cert, aggregator)["readOnly"] is True

    service = docs["Service/wattmeter-aggregator"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    ports = {port["name"]: port["port"] for port in service["spec"]["ports"]}
    assert ports == {
        "grpc": int(config.grpc.listen.rsplit(":", 1)[1]),
        "http": int(config.http.listen.rsplit(":", 1)[1]),
    }
    container_ports = {port["name"] for port in aggregator["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} == container_ports

    agent_config = documents(AGENT)["ConfigMap/wattmeter-agent"]["data"]["agent.toml"]
    target = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{ports['grpc']}"
    assert f'target = "{target}"' in agent_config  # the agents stream to this Service


@pytest.mark.parametrize("path", [AGENT, AGGREGATOR], ids=["agent", "aggregator"])
def test_everything_is_in_the_wattmeter_namespace(path: Path) -> None:
    for name, doc in documents(path).items():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "wattmeter", name
