"""`unet-train manifests --target kubeflow`: the MPIJob and TFJob validate against the operators'
published CRD schemas (tests/crd_schemas/, see its README), read strictly: an unknown field is an
error, as with `kubectl apply --validate=strict`. No cluster runs here."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from support.procs import run_bounded, unet_train_cmd
from trainer.config.loader import load_settings

SCHEMAS = Path(__file__).resolve().parent / "crd_schemas"


def strict(schema: dict) -> dict:
    """Close every object schema that lists its properties (the API server's strict field
    validation); objects marked x-kubernetes-preserve-unknown-fields stay open."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    if isinstance(schema.get("items"), dict):
        schema["items"] = strict(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = strict(schema["additionalProperties"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [strict(sub) for sub in schema[key]]
    return schema


@pytest.fixture(scope="module")
def validators():
    return {kind: jsonschema.Draft7Validator(strict(json.loads((SCHEMAS / name).read_text())))
            for kind, name in (("MPIJob", "mpijob-v2beta1.schema.json"), ("TFJob", "tfjob-v1.schema.json"))}


def render(tmp_path: Path, mode: str, *flags: str) -> list[dict]:
    out = tmp_path / f"{mode}.yaml"
    result = run_bounded(unet_train_cmd("manifests", "--target", "kubeflow", "--mode", mode, "--out", out,
                                        "--run-name", "exp_1", *flags), 60, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"wrote {out}" in result.stdout
    text = out.read_text()
    assert "&id" not in text and "*id" not in text  # plain YAML, no anchors
    return list(yaml.safe_load_all(text))


def errors(validator, document) -> list[str]:
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(document)]


def by_kind(documents) -> dict:
    return {doc["kind"]: doc for doc in documents}


def test_mpijob_validates_and_carries_image_threads_settings_and_claim(tmp_path, validators):
    docs = by_kind(render(tmp_path, "horovod", "--image", "registry.example/unet-train:1.0", "--workers", "3",
                          "--threads", "6", "--set", "train.epochs=7"))
    job = docs["MPIJob"]
    assert job["apiVersion"] == "kubeflow.org/v2beta1" and job["metadata"]["name"] == "unet-train-exp-1"
    assert errors(validators["MPIJob"], job) == []
    specs = job["spec"]["mpiReplicaSpecs"]
    launcher = specs["Launcher"]["template"]["spec"]["containers"][0]
    worker = specs["Worker"]["template"]["spec"]["containers"][0]
    assert specs["Worker"]["replicas"] == 3 and job["spec"]["slotsPerWorker"] == 1
    assert launcher["command"] == ["mpirun"] and launcher["args"][:2] == ["-np", "3"]
    assert "unet-train" in launcher["args"] and "horovod" in launcher["args"]
    assert worker["image"] == launcher["image"] == "registry.example/unet-train:1.0"
    assert worker["resources"]["requests"]["cpu"] == "6" and "nvidia.com/gpu" not in worker["resources"]["limits"]
    settings = yaml.safe_load(docs["ConfigMap"]["data"]["settings.yaml"])
    assert settings["cpu"]["intra_op_threads"] == 6 and settings["cpu"]["omp_num_threads"] == 6
    assert settings["train"]["epochs"] == 7 and settings["train"]["dist"] == "horovod"
    claim = docs["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = specs["Worker"]["template"]["spec"]["volumes"]
    assert {"name": "workspace", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}} in volumes
    assert {"name": "settings", "configMap": {"name": docs["ConfigMap"]["metadata"]["name"]}} in volumes


def test_mpijob_requests_gpus_per_worker_when_asked(tmp_path, validators):
    job = by_kind(render(tmp_path, "horovod", "--gpus-per-worker", "4", "--workers", "2", "--threads", "2"))["MPIJob"]
    assert errors(validators["MPIJob"], job) == []
    worker = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert job["spec"]["slotsPerWorker"] == 4  # one rank per GPU
    launcher = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    assert launcher["args"][:2] == ["-np", "8"] and worker["resources"]["requests"]["cpu"] == "8"


def test_tfjob_validates_with_ps_worker_chief_and_the_operators_addresses(tmp_path, validators):
    docs = by_kind(render(tmp_path, "ps", "--workers", "3", "--ps", "2", "--namespace", "brain", "--threads", "5"))
    job = docs["TFJob"]
    assert job["apiVersion"] == "kubeflow.org/v1" and errors(validators["TFJob"], job) == []
    specs = job["spec"]["tfReplicaSpecs"]
    assert {k: v["replicas"] for k, v in specs.items()} == {"Chief": 1, "PS": 2, "Worker": 3}
    for kind, spec in specs.items():
        container = spec["template"]["spec"]["containers"][0]
        assert container["name"] == "tensorflow" and container["resources"]["requests"]["cpu"] == "5"
        assert {"name": "tfjob-port", "containerPort": 2222} in container["ports"]
    worker = specs["Worker"]["template"]["spec"]["containers"][0]
    assert worker["args"][:3] == ["worker", "--index", "$(REPLICA_INDEX)"]
    assert worker["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['training.kubeflow.org/replica-index']"
    assert specs["Chief"]["template"]["spec"]["containers"][0]["args"][0] == "chief"
    # the settings carry the layout the operator's headless services give: <job>-<type>-<i>.<ns>.svc:<port>
    path = tmp_path / "settings.yaml"
    path.write_text(docs["ConfigMap"]["data"]["settings.yaml"])
    settings = load_settings(path)  # and they are valid settings
    assert settings.cluster.ps_hosts == ("unet-train-exp-1-ps-0.brain.svc:2222", "unet-train-exp-1-ps-1.brain.svc:2222")
    assert settings.cluster.worker_hosts[2] == "unet-train-exp-1-worker-2.brain.svc:2222"
    assert settings.cluster.chief_host == "unet-train-exp-1-chief-0.brain.svc:2222"
    assert settings.cpu.intra_op_threads == 5 and docs["ConfigMap"]["metadata"]["namespace"] == "brain"


def test_tfjob_ports_admit_only_the_jobs_own_pods(tmp_path, validators):
    """TensorFlow's gRPC servers authenticate no one: a NetworkPolicy lets only the job's pods in."""
    docs = by_kind(render(tmp_path, "ps", "--namespace", "brain", "--set", "cluster.control_port=3000"))
    policy = docs["NetworkPolicy"]
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["metadata"]["namespace"] == "brain"
    selected = policy["spec"]["podSelector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": selected}}]  # nothing else: no namespace, no IP block
    assert sorted(p["port"] for p in rule["ports"]) == [2222, 3000]
    for kind, spec in docs["TFJob"]["spec"]["tfReplicaSpecs"].items():  # every pod of the job is selected
        labels = spec["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in selected.items()), kind
    assert errors(validators["TFJob"], docs["TFJob"]) == []
    other = by_kind(render(tmp_path, "ps", "--run-name", "other"))["NetworkPolicy"]
    assert other["spec"]["podSelector"] != policy["spec"]["podSelector"]  # another job's pods are not admitted


def test_the_strict_schema_catches_typos_and_wrong_types(tmp_path, validators):
    """The check can fail: an unknown field, a wrong type or a missing required key is reported."""
    job = by_kind(render(tmp_path, "ps"))["TFJob"]
    typo = copy.deepcopy(job)
    typo["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["resource"] = {}
    assert any("resource" in e for e in errors(validators["TFJob"], typo))
    wrong = copy.deepcopy(job)
    wrong["spec"]["tfReplicaSpecs"]["PS"]["replicas"] = "one"
    assert errors(validators["TFJob"], wrong)
    missing = copy.deepcopy(job)
    del missing["spec"]["tfReplicaSpecs"]
    assert any("tfReplicaSpecs" in e for e in errors(validators["TFJob"], missing))
    mpi = by_kind(render(tmp_path, "horovod"))["MPIJob"]
    mpi["spec"]["mpiImplementation"] = "MVAPICH"
    assert errors(validators["MPIJob"], mpi)


def test_a_run_name_too_long_for_kubernetes_is_refused(tmp_path):
    result = run_bounded(unet_train_cmd("manifests", "--target", "kubeflow", "--mode", "ps", "--run-name", "x" * 60,
                                        "--out", tmp_path / "m.yaml"), 60, cwd=tmp_path)
    assert result.returncode != 0 and "train.run_name" in result.stdout and "Traceback" not in result.stdout
    assert not (tmp_path / "m.yaml").exists()
    image = run_bounded(unet_train_cmd("manifests", "--target", "kubeflow", "--image", "x;rm -rf /",
                                       "--out", tmp_path / "m.yaml"), 60, cwd=tmp_path)
    assert image.returncode != 0 and "cluster.kubeflow.image" in image.stdout
