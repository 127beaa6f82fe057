"""The docs are executed (issue 37): every shell block of README.md and docs/*.md (a fence whose
info string is bash, sh, shell or console) and the workflow that ``unet-train --help`` prints run
here, as a user following that page would, and must exit 0, or the code the text promises
(a trailing ``# exits N`` comment on the command).

One case per document: its blocks run in order, each in a fresh bash, all in one fresh folder.
That folder is a view of this checkout (a symlink to each tracked top-level entry and to .venv,
nothing else), since the docs are read in a clone: ``bash scripts/demo.sh`` and ``scripts/setup.sh``
run there, and ``data/``, ``runs/`` and ``masks/`` are written there, never into the checkout.
What makes it small is only what a user could set too: a tiny ``./settings.yaml`` (TINY_SETTINGS:
4/2 filters, 2 steps an epoch, 32-pixel slices and 32³ crops, fp32, free ports) and the
environment (UNET_TRAIN_SYNTH_SIZE=48,40,32, read by ``synth`` as its --size default;
DEMO_CASES/DEMO_EPOCHS/DEMO_STEPS for scripts/demo.sh; OMPI_ALLOW_RUN_AS_ROOT* for mpirun as root;
SLURM_CONF naming the test Slurm). No command is rewritten. On a machine whose own interfaces carry
a public address, settings.yaml also says ``cluster.allow_public_network: true``, as any user
there must before a parameter-server role starts.

Per kind of block:

* Plain commands run as written, each checked for its exit code; a failure names the file, line
  and command, with the output since that command started. ``bash scripts/test.sh`` is not run
  (it would run this suite inside itself): the test asserts instead that .ci/run, what CI executes,
  runs it.
* ``unet-train ps`` and ``unet-train worker`` (the PS roles, "in separate terminals") run in the
  background while the block's other lines (the chief) run; then each is waited for, bounded, and
  must exit 0 (the chief tells them to stop).
* ``horovodrun`` and ``mpirun`` start real ranks (Gloo and Open MPI).
* Host names (node1, node2, node3) are three real sshd on 127.0.0.2-4 (tests/support/sshd_hosts.py).
  The document runs in a private mount namespace (``unshare --mount``, root only) in which
  /etc/hosts maps the names to those addresses, ~/.ssh (the login's, which ssh reads whatever
  $HOME says) holds the client key, a config with the port and known_hosts, and /srv is a scratch
  folder; each sshd runs in such a namespace too, so the remote side sees the same. So the
  launcher's name checks, Ansible, rsync, ssh, horovodrun and the PS roles' gRPC all meet the
  names as they would on a cluster. The sshd port is ``cluster.ssh_port`` in settings.yaml (the
  launcher passes ``-p`` itself).
* Slurm blocks run against a real single-node slurmctld/slurmd/munged (tests/support/slurm_cluster.py,
  partition ``debug``).
* External infrastructure this project cannot have here is replaced by PATH shims that record
  their arguments and check them: ``docker`` (build: the context holds the Dockerfile, -t names
  the tag; push: only a tag that was built), ``kubectl`` (apply -f: every document parses, has
  apiVersion/kind/metadata.name, MPIJob and TFJob validate strictly against the CRD schemas in
  tests/crd_schemas as in tests/test_kubeflow.py, and their images were pushed) and ``module``
  (environment modules: load is recorded; the tools are already on PATH). Everything of the
  project itself runs for real.

Every process is started in its own session and killed by PID (its group) on timeout; after a
document, anything still mentioning its folder or the hosts' workdir is killed by PID and fails
the test.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.procs import REPO_ROOT, free_port_block, processes_mentioning
from support.sshd_hosts import SSHD

pytestmark = pytest.mark.slow  # runs every documented command: minutes, not in scripts/test.sh --fast

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
HELP_SOURCE = "unet-train --help"
SHELL_INFO = {"bash", "sh", "shell", "console"}
# A fence's first line: up to 3 spaces, 3+ backticks or tildes, then the info string (its first word counts).
FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\s`]*)")
# The first word of a line that is a command, for telling a mislabelled block from a listing.
COMMAND_WORDS = {"unet-train", "bash", "sh", "python", "python3", "horovodrun", "mpirun", "docker", "kubectl",
                 "module", "sbatch", "srun", "scancel", "ssh", "pip", "make", "$"}
EXITS = re.compile(r"(?:^|\s)#\s*exits?\s+(\d+)\b")
# Long-running servers of a block: started in the background, then waited for once the rest is done.
SERVERS = (("unet-train", "ps"), ("unet-train", "worker"))
# Not run here, with the check that stands in for running it.
NOT_RUN = {"bash scripts/test.sh": "runs this very suite (CI runs it through .ci/run)"}
HOSTS = {"node1": "127.0.0.2", "node2": "127.0.0.3", "node3": "127.0.0.4"}
HOSTS_WORKDIR = "/srv/unet-train"   # cluster.workdir in TINY_SETTINGS: /srv is private to the namespace
SYNTH_SIZE = "48,40,32"
# Seconds one command may take, by its first words (the first prefix that matches).
BUDGETS = ((("unet-train", "distributed", "--stop"), 120), (("unet-train", "distributed"), 360),
           (("unet-train", "doctor"), 120), (("horovodrun",), 300), (("mpirun",), 300),
           (("bash", "scripts/demo.sh"), 300), (("unet-train", "plan"), 240), ((), 180))
SERVER_WAIT_S = 90
# Left running by design when a document ends (killed by PID all the same): a launch's TensorBoard
# ("TensorBoard keeps running (stop: unet-train distributed --stop --run-name R)"), and Ansible's
# ssh ControlPersist masters (60 s after its last command).
EXPECTED_LEFT = ("tensorboard.main", "[mux]")
TAIL = 5000


# ---------------------------------------------------------------- extraction

@dataclass(frozen=True)
class Command:
    line: int                 # where it starts in its source (1-based)
    text: str                 # as written (continuation lines kept)
    expect: int = 0           # the exit code the text promises
    output: tuple[str, ...] = ()   # console blocks: the output lines shown under it

    @property
    def words(self) -> list[str]:
        return self.text.replace("\\\n", " ").split()

    @property
    def server(self) -> bool:
        return any(tuple(self.words[:len(prefix)]) == prefix for prefix in SERVERS)

    @property
    def budget(self) -> int:
        return next(seconds for prefix, seconds in BUDGETS if tuple(self.words[:len(prefix)]) == prefix)

    @property
    def not_run(self) -> str | None:
        """Why this command is not run here, if it is one of NOT_RUN (its trailing comment aside)."""
        return NOT_RUN.get(" ".join(str(self).split(" #")[0].split()))

    def __str__(self) -> str:
        return " ".join(self.text.replace("\\\n", " ").split())


@dataclass(frozen=True)
class Block:
    source: str               # README.md, docs/x.md, or "unet-train --help"
    line: int                 # its first body line
    info: str
    commands: tuple[Command, ...]


def fenced_blocks(text: str):
    """(info, first body line, body lines) of every fenced block, in order."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence = match.group("fence")
        close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = i + 1
        while end < len(lines) and not close.match(lines[end]):
            end += 1
        yield match.group("info").lower(), i + 2, lines[i + 1:end]
        i = end + 1


def commands_of(info: str, first: int, body: list[str]) -> tuple[Command, ...]:
    """The commands of a block: bash/sh/shell: every logical line that is not blank or a comment
    (a trailing backslash continues it); console: the ``$ `` lines, the lines under each its output."""
    found: list[Command] = []
    i = 0
    while i < len(body):
        raw = body[i]
        stripped = raw.strip()
        if info == "console":
            if not stripped.startswith("$ "):
                if found and stripped:
                    found[-1] = Command(found[-1].line, found[-1].text, found[-1].expect,
                                        found[-1].output + (stripped,))
                i += 1
                continue
            stripped = stripped[2:]
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        start, parts = i, [stripped]
        while parts[-1].endswith("\\") and i + 1 < len(body):
            i += 1
            parts.append(body[i].strip().removeprefix("> "))
        text = "\n".join(parts)   # as pasted: each backslash-newline joins the next line
        if "<<" in text:
            raise AssertionError(f"line {first + start}: a heredoc in a documented block; the harness does not "
                                 f"split those (extend tests/test_docs_run.py)")
        expect = EXITS.search(text)
        found.append(Command(first + start, text, int(expect.group(1)) if expect else 0))
        i += 1
    return tuple(found)


def guides() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def source_name(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def shell_blocks(path: Path) -> list[Block]:
    return [Block(source_name(path), first, info, commands_of(info, first, body))
            for info, first, body in fenced_blocks(path.read_text()) if info in SHELL_INFO]


def workflow_block() -> Block:
    """The workflow in ``unet-train --help``'s epilog: its indented ``unet-train`` lines."""
    from trainer.commands.args import WORKFLOW

    lines = WORKFLOW.splitlines()
    return Block(HELP_SOURCE, 1, "bash", commands_of("bash", 1, [
        line if line.strip().startswith("unet-train ") else "" for line in lines]))


def documents() -> dict[str, list[Block]]:
    """Every source that has shell blocks -> its blocks, in order; the --help workflow last."""
    found = {source_name(path): blocks for path in guides() if (blocks := shell_blocks(path))}
    found[HELP_SOURCE] = [workflow_block()]
    return found


# ---------------------------------------------------------------- the extraction itself

def test_every_shell_looking_block_is_extracted():
    """A block is run only if its fence says bash/sh/shell/console: a renamed or missing info
    string must not drop commands silently. Every fenced block whose lines start like commands is
    a shell block; and each guide that has ``unet-train`` commands in a fence yields some."""
    problems = []
    for path in guides():
        for info, first, body in fenced_blocks(path.read_text()):
            if info in SHELL_INFO:
                assert commands_of(info, first, body), f"{source_name(path)}:{first}: a {info} block with no command"
                continue
            starts = [line.split()[0] for line in body if line.strip() and not line.startswith(" ")]
            if any(word in COMMAND_WORDS for word in starts):
                problems.append(f"{source_name(path)}:{first}: fence info {info!r} but its lines are commands "
                                f"({', '.join(sorted(set(starts) & COMMAND_WORDS))}); label it bash or console")
    assert problems == []
    docs = documents()
    for name in ("README.md", "docs/datasets.md", "docs/design.md", "docs/distributed.md", "docs/planning.md"):
        assert docs.get(name), f"{name}: no shell block found (renamed fences?)"
    for name, blocks in docs.items():
        for block in blocks:
            assert block.commands, f"{name}:{block.line}: no command"
    help_text = subprocess.run([sys.executable, "-m", "trainer.cli", "--help"], capture_output=True, text=True,
                               timeout=60, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}).stdout
    workflow = workflow_block()
    assert len(workflow.commands) >= 5 and all(str(c).split(" #")[0] in " ".join(help_text.split())
                                              for c in workflow.commands)


def test_extraction_keeps_lines_continuations_codes_and_console_output():
    body = ["# a comment", "unet-train synth --format brats \\", "    --out x   # two lines", "",
            "unet-train config show --set x=1   # exits 2"]
    commands = commands_of("bash", 10, body)
    assert [c.line for c in commands] == [11, 14] and [c.expect for c in commands] == [0, 2]
    assert str(commands[0]) == "unet-train synth --format brats --out x # two lines"
    console = commands_of("console", 3, ["$ unet-train config show   # exits 2", "error: a", "more", "$ true"])
    assert console[0].output == ("error: a", "more") and console[0].expect == 2 and console[1].line == 6
    assert Command(1, "unet-train ps --index 0").server and not Command(1, "unet-train chief").server
    assert Command(1, "bash scripts/test.sh   # the suite").not_run
    assert list(fenced_blocks("x\n````bash\na\n```\nb\n````\n~~~ Console\n$ c\n~~~\n")) == [
        ("bash", 3, ["a", "```", "b"]), ("console", 8, ["$ c"])]


def test_ci_runs_the_readme_test_command():
    """README's ``bash scripts/test.sh`` is what CI executes (.ci/run), not something this suite can run."""
    ci = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    assert "bash scripts/test.sh" in [line.strip() for line in ci]
    readme_commands = [str(c) for block in shell_blocks(README) for c in block.commands]
    assert any(c.startswith("bash scripts/test.sh") for c in readme_commands)


# ---------------------------------------------------------------- the folder a reader stands in

TINY_SETTINGS = """\
# tests/test_docs_run.py: the documented commands, at sizes that train in seconds on 2 cores
data:
  image_size: 32
  crop_size: [32, 32, 32]
  val_crops_per_case: 1
model:
  base_filters_2d: 4
  base_filters_3d: 2
  mirror_axes_2d: []
train:
  epochs: 1
  batch_size: 2
  steps_per_epoch: 2
  validation_steps: 2
  precision: fp32
  image_every_epochs: 0
cluster:
  hosts: [node1, node2]
  mode: ps
  ps_hosts: [127.0.0.1:{ps}]
  worker_hosts: [127.0.0.1:{worker}]
  chief_host: 127.0.0.1:{chief}
  control_port: {control}
  startup_timeout_s: 120
  ssh_port: {ssh}
  workdir: {workdir}
  python: {python}
  slurm: {{port_base: {slurm_base}, poll_s: 0.5}}
{public}logging:
  tensorboard_port: {tensorboard}
"""

DOCKER_SHIM = r'''
import json, sys
from pathlib import Path
state = Path(__file__).resolve().parent
log = lambda **kw: open(state / "calls.jsonl", "a").write(json.dumps({"tool": "docker", **kw}) + "\n")
args = sys.argv[1:]
log(argv=args)
def fail(msg):
    print(f"docker (test shim): {msg}", file=sys.stderr); sys.exit(1)
if args[:1] == ["build"]:
    tags, file, rest, i = [], None, [], 1
    while i < len(args):
        if args[i] in ("-t", "--tag"): tags.append(args[i + 1]); i += 2
        elif args[i] in ("-f", "--file"): file = args[i + 1]; i += 2
        elif args[i] == "--build-arg": i += 2
        else: rest.append(args[i]); i += 1
    if len(rest) != 1: fail(f"build: expected one context folder, got {rest}")
    dockerfile = Path(file) if file else Path(rest[0]) / "Dockerfile"
    if not dockerfile.is_file(): fail(f"build: {dockerfile} not found")
    if not tags: fail("build: no -t TAG")
    with open(state / "built.txt", "a") as f: f.writelines(t + "\n" for t in tags)
    print("\n".join(f"Successfully tagged {t}" for t in tags))
elif args[:1] == ["push"] and len(args) == 2:
    built = (state / "built.txt").read_text().split() if (state / "built.txt").exists() else []
    if args[1] not in built: fail(f"push: {args[1]}: no such image (not built)")
    with open(state / "pushed.txt", "a") as f: f.write(args[1] + "\n")
    print(f"{args[1]}: pushed")
else:
    fail(f"unexpected arguments {args}")
'''

KUBECTL_SHIM = r'''
import json, sys
from pathlib import Path
state = Path(__file__).resolve().parent
args = sys.argv[1:]
open(state / "calls.jsonl", "a").write(json.dumps({"tool": "kubectl", "argv": args}) + "\n")
def fail(msg):
    print(f"kubectl (test shim): {msg}", file=sys.stderr); sys.exit(1)
if args[:2] != ["apply", "-f"] or len(args) != 3:
    fail(f"only 'apply -f FILE' is known here, got {args}")
import jsonschema, yaml
sys.path.insert(0, TESTS)
from test_kubeflow import SCHEMAS, strict
schemas = {"MPIJob": "mpijob-v2beta1.schema.json", "TFJob": "tfjob-v1.schema.json"}
pushed = (state / "pushed.txt").read_text().split() if (state / "pushed.txt").exists() else []
path = Path(args[2])
if not path.is_file(): fail(f"the path \"{path}\" does not exist")
for doc in yaml.safe_load_all(path.read_text()):
    if not doc: continue
    kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
    if not doc.get("apiVersion") or not kind or not name:
        fail(f"{path}: a document without apiVersion/kind/metadata.name")
    if kind in schemas:
        validator = jsonschema.Draft7Validator(strict(json.loads((SCHEMAS / schemas[kind]).read_text())))
        errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
        if errors: fail(f"{kind} {name}: " + "; ".join(errors[:5]))
        images = set()
        def walk(node):
            if isinstance(node, dict):
                if "containers" in node:
                    for c in node["containers"]: images.add(c.get("image"))
                for v in node.values(): walk(v)
            elif isinstance(node, list):
                for v in node: walk(v)
        walk(doc)
        missing = sorted(i for i in images if i not in pushed)
        if missing: fail(f"{kind} {name}: image(s) never pushed here: {missing}")
    print(f"{kind.lower()}/{name} created")
'''

MODULE_SHIM = r'''
import json, sys
from pathlib import Path
state = Path(__file__).resolve().parent
args = sys.argv[1:]
open(state / "calls.jsonl", "a").write(json.dumps({"tool": "module", "argv": args}) + "\n")
if not args or args[0] not in ("load", "list", "avail", "purge", "unload"):
    print(f"module (test shim): unknown subcommand {args[:1]}", file=sys.stderr); sys.exit(1)
if args[0] == "load" and len(args) < 2:
    print("module (test shim): load what?", file=sys.stderr); sys.exit(1)
'''

# Runs its arguments in a private mount namespace: /etc/hosts names the test hosts, the login's
# ~/.ssh (ssh reads it from the passwd entry, not $HOME) is the harness's, /srv is scratch. With
# NS_HOSTNAME also its own host name (a UTS namespace): each sshd "host" is then a node of its own
# for Open MPI, which otherwise took two of them for one and joined them through shared memory
# across mount namespaces (seen: a segfault in mca_btl_vader at MPI_Comm_dup).
NAMESPACE = """\
#!/bin/sh
uts=; [ -z "$NS_HOSTNAME" ] || uts=--uts
exec unshare --mount $uts --propagation private -- /bin/sh -c \\
  'mount --bind "$0/hosts" /etc/hosts && mount --bind "$0/home/.ssh" "$1" && mount --bind "$0/srv" /srv && \\
   if [ -n "$NS_HOSTNAME" ]; then hostname "$NS_HOSTNAME"; fi && shift && exec "$@"' \\
  {root} {login_ssh} "$@"
"""


@dataclass
class Services:
    ssh: object = None
    slurm: object = None
    made: Path | None = None   # the login's ~/.ssh, when the harness created it as a mount point

    def stop(self) -> None:
        if self.ssh is not None:
            self.ssh.stop()
        if self.slurm is not None:
            self.slurm.stop()
        if self.made is not None and not any(self.made.iterdir()):
            self.made.rmdir()


@dataclass
class Reader:
    """One document's fresh folder, environment, shims and (where it names them) hosts and Slurm."""
    root: Path
    work: Path = field(init=False)
    env: dict = field(init=False)
    namespace: list = field(default_factory=list)
    services: Services = field(default_factory=Services)
    timings: list = field(default_factory=list)

    def __post_init__(self):
        self.work, home, bin_dir = self.root / "work", self.root / "home", self.root / "bin"
        for folder in (self.work, home / ".ssh", bin_dir, self.root / "srv"):
            folder.mkdir(parents=True, exist_ok=True)
        (home / ".ssh").chmod(0o700)
        for name in tracked_top_level() + [".venv"]:
            if (REPO_ROOT / name).exists() and name not in ("settings.yaml", "data", "runs"):
                (self.work / name).symlink_to(REPO_ROOT / name)
        for name, code in (("docker", DOCKER_SHIM), ("kubectl", KUBECTL_SHIM), ("module", MODULE_SHIM)):
            shim = bin_dir / name
            shim.write_text(f"#!{sys.executable}\nTESTS = {str(REPO_ROOT / 'tests')!r}\n{code}")
            shim.chmod(0o755)
        self.env = {**os.environ, "HOME": str(home), "PATH": os.pathsep.join(
            [str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "UNET_TRAIN_SYNTH_SIZE": SYNTH_SIZE, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONDONTWRITEBYTECODE": "1",
            "DEMO_CASES": "6", "DEMO_EPOCHS": "1", "DEMO_STEPS": "2"}
        for key in ("PYTHONPATH", "VIRTUAL_ENV", "SLURM_CONF", "PYTEST_CURRENT_TEST"):
            self.env.pop(key, None)
        if os.geteuid() == 0:
            self.env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        # worker .. worker+2: a launch with 3 worker hosts takes the listed port + 1, + 2 (launcher/ssh/plan.py);
        # slurm_base .. +4: a PS job's 4 tasks and the chief's control port
        base = free_port_block(16, ["127.0.0.1", *HOSTS.values()])
        self.ports = {"ps": base, "worker": base + 1, "chief": base + 4, "control": base + 5, "tensorboard": base + 6,
                      "slurm_base": base + 8, "ssh": 22}   # ssh: the sshd hosts' port once started

    def write_settings(self) -> None:
        """TINY_SETTINGS with this document's ports. On a machine whose interfaces carry a public
        address (seen: a sandbox's eth0 on 192.0.2.2, TEST-NET-1), every PS role refuses to start
        unless cluster.allow_public_network says the network is isolated, as it must for any user there."""
        from trainer.runtime.network import public_interface_addresses

        found = public_interface_addresses()
        public = (f"  allow_public_network: true   # this machine carries {', '.join(a for _, a in found)}\n"
                  if found else "")
        (self.work / "settings.yaml").write_text(TINY_SETTINGS.format(
            workdir=HOSTS_WORKDIR, python=sys.executable, public=public, **self.ports))

    def start_hosts(self) -> None:
        """Three sshd (node1-3 = 127.0.0.2-4) and this document, in mount namespaces that name them."""
        if os.geteuid() != 0 or not shutil.which("unshare") or not Path(SSHD).exists():
            pytest.skip("the hosts node1-3 need root (a private mount namespace), unshare and sshd")
        import support.sshd_hosts as sshd_hosts

        login_ssh = Path(pwd.getpwuid(os.geteuid()).pw_dir) / ".ssh"
        if not login_ssh.exists():   # a mount point is needed; removed again in stop() if still empty
            login_ssh.mkdir(mode=0o700)
            self.services.made = login_ssh
        system_hosts = Path("/etc/hosts").read_text()
        (self.root / "hosts").write_text(system_hosts.rstrip("\n") + "\n" + "".join(
            f"{address} {name}\n" for name, address in HOSTS.items()))
        wrapper = self.root / "bin" / "in-namespace"
        wrapper.write_text(NAMESPACE.format(root=self.root, login_ssh=login_ssh))
        wrapper.chmod(0o755)
        ns_sshd = self.root / "ns-sshd"
        names = "".join(f"    ListenAddress={address}) NS_HOSTNAME={name} ;;\n" for name, address in HOSTS.items())
        ns_sshd.write_text(f"#!/bin/sh\nfor arg; do\n  case \"$arg\" in\n{names}  esac\ndone\n"
                           f"export NS_HOSTNAME\nexec {wrapper} {SSHD} \"$@\"\n")
        ns_sshd.chmod(0o755)
        original = sshd_hosts.SSHD
        sshd_hosts.SSHD = str(ns_sshd)
        try:
            hosts = sshd_hosts.start_sshd_hosts(self.root / "sshd", tuple(HOSTS.values()))
        finally:
            sshd_hosts.SSHD = original
        self.services.ssh = hosts
        self.ports["ssh"] = hosts.port
        ssh = self.root / "home" / ".ssh"
        shutil.copy(hosts.key, ssh / "id_ed25519")
        shutil.copy(f"{hosts.key}.pub", ssh / "id_ed25519.pub")
        (ssh / "id_ed25519").chmod(0o600)
        key = (self.root / "sshd" / "host_key.pub").read_text().split()
        (ssh / "known_hosts").write_text("".join(f"[{name}]:{hosts.port} {key[0]} {key[1]}\n"
                                                 for name in [*HOSTS, *HOSTS.values()]))
        (ssh / "config").write_text("".join(f"Host {name} {address}\n  Port {hosts.port}\n"
                                            f"  IdentityFile ~/.ssh/id_ed25519\n" for name, address in HOSTS.items()))
        (ssh / "config").chmod(0o600)
        self.namespace = [str(wrapper)]

    def start_slurm(self) -> None:
        from support.slurm_cluster import available, start_slurm_cluster

        if not available():
            pytest.skip("the Slurm blocks need slurmctld, slurmd and munged, as root")
        self.services.slurm = start_slurm_cluster()
        self.env.update(self.services.slurm.env)

    def run_block(self, block: Block) -> None:
        script = self.root / f"block-{block.line}.sh"
        script.write_text(block_script(block))
        log = self.root / f"block-{block.line}.log"
        by_line = {c.line: c for c in block.commands}
        with open(log, "w") as out:
            proc = subprocess.Popen([*self.namespace, "bash", str(script)], cwd=self.work, env=self.env,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        current, deadline, started, seen = None, None, time.monotonic(), 0
        try:
            while proc.poll() is None:
                markers = re.findall(r"@@DOCRUN (start|wait) (\d+)", log.read_text(errors="replace"))
                for kind, line in markers[seen:]:
                    now = time.monotonic()
                    if current is not None:
                        self.timings.append((block.source, current.line, str(current), now - started))
                    current, started = by_line[int(line)], now
                    deadline = now + (SERVER_WAIT_S if kind == "wait" else current.budget)
                seen = len(markers)
                if deadline is not None and time.monotonic() > deadline:
                    kill_session(proc)
                    pytest.fail(failure(block, current, f"still running after {current.budget if current else 0} s "
                                                        f"(killed)", log.read_text(errors="replace")))
                time.sleep(0.2)
        finally:
            kill_session(proc)
        text = log.read_text(errors="replace")
        if current is not None:
            self.timings.append((block.source, current.line, str(current), time.monotonic() - started))
        failed = re.search(r"@@DOCRUN fail (\d+) (\d+)", text)
        if failed:
            command = by_line[int(failed.group(1))]
            pytest.fail(failure(block, command, f"exited {failed.group(2)} (expected {command.expect})", text))
        if proc.returncode != 0 or "@@DOCRUN done" not in text:
            pytest.fail(failure(block, current, f"the block's shell ended with {proc.returncode}", text))
        for command in block.commands:
            missing = [line for line in command.output if line not in text]
            if missing:
                pytest.fail(failure(block, command, f"its output lacks {missing}", text))

    def leftovers(self) -> list[str]:
        """Processes still mentioning this folder or the hosts' workdir, killed by PID; those not
        left by design (EXPECTED_LEFT) are returned, to fail the test."""
        import psutil

        left = processes_mentioning(self.root) + (processes_mentioning(HOSTS_WORKDIR) if self.namespace else [])
        for entry in left:
            try:
                psutil.Process(int(entry.split(":", 1)[0])).kill()
            except psutil.Error:
                pass
        return [entry for entry in left if not any(mark in entry for mark in EXPECTED_LEFT)]


def tracked_top_level() -> list[str]:
    try:
        files = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
                               check=True).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return sorted(p.name for p in REPO_ROOT.iterdir() if not p.name.startswith("."))
    return sorted({f.split("/", 1)[0] for f in files if f})




def block_script(block: Block) -> str:
    """The block as bash: each command as written, framed by markers that the harness follows
    (which command runs, which failed with what code); servers in the background, waited for last."""
    out = [f"# {block.source}:{block.line}, written by tests/test_docs_run.py", "set -o pipefail",
           "__fail() { printf '\\n@@DOCRUN fail %s %s\\n' \"$1\" \"$2\"; exit 97; }", "__bg=()"]
    for command in block.commands:
        out.append(f"printf '\\n@@DOCRUN start {command.line}\\n'")
        if command.not_run:
            out.append(f"# not run here: {command.not_run}")
        elif command.server:
            out += ["{", command.text, "} &"]   # the newline ends a trailing comment before the &
            out.append(f"__bg+=(\"$!:{command.line}\")")
        else:
            out.append(command.text)
            out.append(f"__rc=$?; [ \"$__rc\" -eq {command.expect} ] || __fail {command.line} \"$__rc\"")
    out += ["for __job in \"${__bg[@]}\"; do",
            "  printf '\\n@@DOCRUN wait %s\\n' \"${__job#*:}\"",
            "  wait \"${__job%%:*}\"; __rc=$?; [ \"$__rc\" -eq 0 ] || __fail \"${__job#*:}\" \"$__rc\"",
            "done", "printf '\\n@@DOCRUN done\\n'", ""]
    return "\n".join(out)


def kill_session(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=30)


def failure(block: Block, command: Command | None, what: str, text: str) -> str:
    where = f"{block.source}:{command.line if command else block.line}"
    since = text[text.rfind(f"@@DOCRUN start {command.line}"):] if command else text
    return f"{where}: `{command}` {what}\n--- its output (last {TAIL} characters) ---\n{since[-TAIL:]}"


# ---------------------------------------------------------------- one case per document

DOCUMENTS = documents()
# pytest's 600 s per test is too short for a page that launches on hosts and Slurm (about 8 minutes
# on an idle 2-core machine, 12 while other suites ran); each command has its own budget too.
LONG_PAGE_TIMEOUT_S = 1500


def document_params():
    for source, blocks in DOCUMENTS.items():
        texts = " ".join(str(c) for block in blocks for c in block.commands)
        long_page = "unet-train distributed" in texts
        yield pytest.param(source, marks=[pytest.mark.timeout(LONG_PAGE_TIMEOUT_S)] if long_page else [])


@pytest.mark.parametrize("source", list(document_params()))
def test_document_runs(source, tmp_path):
    blocks = DOCUMENTS[source]
    for block in blocks:
        for command in block.commands:
            if command.not_run:
                test_ci_runs_the_readme_test_command()
    reader = Reader(tmp_path)
    texts = " ".join(str(c) for block in blocks for c in block.commands)
    try:
        if any(re.search(rf"\b{name}\b", texts) for name in HOSTS):
            reader.start_hosts()
        if "--scheduler slurm" in texts:
            reader.start_slurm()
        reader.write_settings()
        for block in blocks:
            reader.run_block(block)
    finally:
        reader.services.stop()
        left = reader.leftovers()
        report = "\n".join(f"docrun {s}:{line} {t:6.1f} s  {c[:110]}" for s, line, c, t in reader.timings)
        print(report)
        (tmp_path / "timings.txt").write_text(report + "\n")
    assert left == [], f"{source}: processes left running (killed): {left}"


def test_the_shims_refuse_what_the_real_tools_would(tmp_path):
    """The stand-ins check what they are given: a build without a Dockerfile, a push of an image
    never built, a manifest that breaks the CRD schema or names an image never pushed, and an
    unknown module subcommand all fail, as the real tools (or a cluster) would."""
    import yaml

    reader = Reader(tmp_path)
    env, bin_dir = reader.env, tmp_path / "bin"

    def run(*argv, cwd=tmp_path):
        return subprocess.run([str(bin_dir / argv[0]), *argv[1:]], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=60)

    (tmp_path / "ctx").mkdir()
    assert run("docker", "build", "-t", "r/x:1", "ctx").returncode == 1            # no Dockerfile there
    assert run("docker", "push", "r/x:1").returncode == 1                          # never built
    assert run("docker", "build", "-t", "r/x:1", ".", cwd=reader.work).returncode == 0
    assert run("docker", "push", "r/x:1").returncode == 0
    assert run("module", "frobnicate").returncode == 1 and run("module", "load", "gcc").returncode == 0
    out = tmp_path / "job.yaml"
    made = subprocess.run([sys.executable, "-m", "trainer.cli", "manifests", "--target", "kubeflow", "--mode",
                           "horovod", "--image", "r/x:1", "--out", str(out)], cwd=reader.work, env=env,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert run("kubectl", "apply", "-f", str(out)).returncode == 0
    documents = list(yaml.safe_load_all(out.read_text()))
    job = next(doc for doc in documents if doc["kind"] == "MPIJob")
    job["spec"]["slotsPerWorkr"] = 1                                               # a field the CRD lacks
    out.write_text(yaml.safe_dump_all(documents))
    refused = run("kubectl", "apply", "-f", str(out))
    assert refused.returncode == 1 and "slotsPerWorkr" in refused.stderr
    del job["spec"]["slotsPerWorkr"]
    out.write_text(yaml.safe_dump_all(documents).replace("r/x:1", "r/x:2"))
    refused = run("kubectl", "apply", "-f", str(out))
    assert refused.returncode == 1 and "never pushed" in refused.stderr
    assert run("kubectl", "get", "pods").returncode == 1
