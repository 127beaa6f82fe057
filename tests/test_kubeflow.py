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


# ---------------------------------------------------------------- MPIJob that starts, TFJob that survives its start order

def containers(job: dict, kind: str) -> list[dict]:
    specs = job["spec"].get("mpiReplicaSpecs") or job["spec"]["tfReplicaSpecs"]
    return specs[kind]["template"]["spec"]["containers"]


def test_mpijob_starts_workers_first_and_passes_the_environment(tmp_path, validators):
    from launcher.kubeflow import SSH_PORT

    job = by_kind(render(tmp_path, "horovod", "--workers", "2", "--threads", "3"))["MPIJob"]
    assert errors(validators["MPIJob"], job) == []
    spec = job["spec"]
    assert spec["launcherCreationPolicy"] == "WaitForWorkersReady"  # no mpirun before every sshd is up
    [worker] = containers(job, "Worker")
    assert worker["readinessProbe"]["tcpSocket"] == {"port": SSH_PORT}
    assert {"name": "ssh", "containerPort": SSH_PORT} in worker["ports"]
    [launcher] = containers(job, "Launcher")
    args = launcher["args"]
    exported = {args[i + 1] for i, arg in enumerate(args) if arg == "-x"}
    assert {"PATH", "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"} <= exported
    assert args.index("-x") < args.index("unet-train")  # mpirun's options, not the program's
    env = {item["name"]: item["value"] for item in launcher["env"]}
    assert env["OMP_NUM_THREADS"] == env["TF_NUM_INTRAOP_THREADS"] == "3"
    # /dev/shm: a memory emptyDir on the workers, where the ranks run (NCCL's shared memory)
    pod = spec["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    shm = next(v for v in pod["volumes"] if v.get("emptyDir") is not None)
    assert shm["emptyDir"] == {"medium": "Memory"}
    assert {"name": shm["name"], "mountPath": "/dev/shm"} in worker["volumeMounts"]


def test_mpijob_runs_as_the_images_non_root_user_or_as_root(tmp_path, validators):
    from launcher.kubeflow import USER_HOME, USER_ID, render as render_documents
    from trainer.config.settings import Settings, TrainSettings

    job = by_kind(render(tmp_path, "horovod"))["MPIJob"]  # the default: mpi-operator's non-root example
    assert job["spec"]["sshAuthMountPath"] == "/home/mpiuser/.ssh" == f"{USER_HOME}/.ssh" and USER_ID == 1000
    for kind in ("Launcher", "Worker"):
        pod = job["spec"]["mpiReplicaSpecs"][kind]["template"]["spec"]
        assert pod["securityContext"]["fsGroup"] == 1000, kind  # the workspace volume is writable by it
        [container] = pod["containers"]
        assert container["securityContext"]["runAsUser"] == 1000, kind
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    [worker] = containers(job, "Worker")
    assert worker["command"] == ["/usr/sbin/sshd"] and worker["args"] == ["-De", "-f", "/home/mpiuser/.sshd_config"]
    assert "--allow-run-as-root" not in containers(job, "Launcher")[0]["args"]
    root = by_kind(render_documents(Settings(train=TrainSettings(run_name="r")), "horovod", user=None))["MPIJob"]
    assert errors(validators["MPIJob"], root) == []
    assert "sshAuthMountPath" not in root["spec"]  # the operator's default, /root/.ssh
    assert "securityContext" not in containers(root, "Worker")[0] and containers(root, "Worker")[0]["args"] == ["-De"]
    assert "--allow-run-as-root" in containers(root, "Launcher")[0]["args"]


def test_tfjob_restarts_workers_and_mounts_a_per_run_token_secret(tmp_path, validators):
    from launcher.kubeflow import TOKEN_DIR, TOKEN_FILE

    out = tmp_path / "ps.yaml"
    docs = by_kind(render(tmp_path, "ps", "--set", "cluster.max_restarts=5"))
    job = docs["TFJob"]
    assert errors(validators["TFJob"], job) == []
    specs = job["spec"]["tfReplicaSpecs"]
    assert specs["Worker"]["restartPolicy"] == "OnFailure" and job["spec"]["runPolicy"]["backoffLimit"] == 5
    assert specs["PS"]["restartPolicy"] == specs["Chief"]["restartPolicy"] == "Never"
    secret = docs["Secret"]
    token = secret["stringData"]["token"]
    assert secret["type"] == "Opaque" and len(token) == 64 and int(token, 16) >= 0
    for kind, spec in specs.items():
        pod = spec["template"]["spec"]
        volume = next(v for v in pod["volumes"] if "secret" in v)
        assert volume["secret"] == {"secretName": secret["metadata"]["name"], "defaultMode": 0o400}, kind
        [container] = pod["containers"]
        assert {"name": volume["name"], "mountPath": TOKEN_DIR, "readOnly": True} in container["volumeMounts"], kind
    settings = yaml.safe_load(docs["ConfigMap"]["data"]["settings.yaml"])
    assert settings["cluster"]["token_file"] == TOKEN_FILE
    assert (out.stat().st_mode & 0o777) == 0o600  # the file holds the token
    assert "--enable-scheme=tfjob" in out.read_text().splitlines()[1]  # next to mpi-operator: the CRD conflict
    again = by_kind(render(tmp_path, "ps"))["Secret"]["stringData"]["token"]
    assert again != token  # a fresh token per rendering (per run)


# ---------------------------------------------------------------- the image's ssh settings (docker/ssh/)

def ssh_options(path: Path) -> dict[str, str]:
    """'Keyword value' lines of an ssh(d) config file, keywords lower-cased (ssh reads them so)."""
    options = {}
    for line in path.read_text().splitlines():
        words = line.split(None, 1)
        if words and not words[0].startswith("#") and len(words) == 2:
            options.setdefault(words[0].lower(), words[1].strip())
    return options


def test_the_image_installs_the_ssh_settings_mpi_operator_relies_on():
    """mpi-operator's build/base/Dockerfile: StrictHostKeyChecking no and UserKnownHostsFile /dev/null
    for the client, StrictModes no for sshd. Ours are drop-ins from docker/ssh/, the same port as
    the manifests' readiness probe, copied by the Dockerfile where Debian's configs include them."""
    from launcher.kubeflow import SSH_DIR, SSH_PORT, USER_HOME

    client = ssh_options(SSH_DIR / "ssh_config.conf")
    assert client["host"] == "*" and client["stricthostkeychecking"] == "no"
    assert client["userknownhostsfile"] == "/dev/null" and client["port"] == str(SSH_PORT)
    server = ssh_options(SSH_DIR / "sshd_config.conf")
    assert server["strictmodes"] == "no" and server["port"] == str(SSH_PORT)
    assert server["passwordauthentication"] == "no"
    user = ssh_options(SSH_DIR / "mpiuser_sshd_config")  # sshd -f, as the non-root user
    assert user["include"] == "/etc/ssh/sshd_config.d/*.conf"
    assert user["hostkey"] == f"{USER_HOME}/.ssh/id_rsa" and user["pidfile"].startswith(USER_HOME)
    dockerfile = (SSH_DIR.parent.parent / "Dockerfile").read_text()
    assert "COPY docker/ssh/ssh_config.conf /etc/ssh/ssh_config.d/" in dockerfile
    assert "COPY docker/ssh/sshd_config.conf /etc/ssh/sshd_config.d/" in dockerfile
    assert f"docker/ssh/mpiuser_sshd_config {USER_HOME}/.sshd_config" in dockerfile
