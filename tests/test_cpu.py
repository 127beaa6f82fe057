"""CPU thread planning: physical cores / local ranks, bound processes, explicit settings."""
from __future__ import annotations

import pytest

from trainer.config.settings import CpuSettings
from trainer.hardware import cpu


@pytest.fixture
def unbound_16_cpus(monkeypatch):
    monkeypatch.setattr(cpu, "allowed_cpus", lambda: (16, False))


def test_default_threads_divide_physical_cores_by_local_ranks(unbound_16_cpus):
    plan = cpu.plan_threads(CpuSettings(), local_ranks=2, cores=8, openmp="libiomp5.so")
    assert (plan.intra_op, plan.inter_op) == (4, 2)
    assert plan.env["OMP_NUM_THREADS"] == "4" and plan.env["TF_NUM_INTRAOP_THREADS"] == "4"
    assert plan.env["KMP_BLOCKTIME"] == "1" and plan.env["KMP_AFFINITY"] == "granularity=fine,compact,1,0"
    assert plan.env["TF_ENABLE_ONEDNN_OPTS"] == "1"
    assert cpu.plan_threads(CpuSettings(), local_ranks=3, cores=8).intra_op == 2
    assert cpu.plan_threads(CpuSettings(), local_ranks=16, cores=8).intra_op == 1  # never 0


def test_a_bound_process_uses_its_cpu_subset_without_dividing(monkeypatch):
    monkeypatch.setattr(cpu, "allowed_cpus", lambda: (3, True))  # e.g. mpirun --bind-to socket
    assert cpu.plan_threads(CpuSettings(), local_ranks=4, cores=12).intra_op == 3
    monkeypatch.setattr(cpu, "allowed_cpus", lambda: (2, False))  # a 2-CPU machine reporting 8 cores
    assert cpu.plan_threads(CpuSettings(), local_ranks=1, cores=8).intra_op == 2


def test_explicit_settings_win(unbound_16_cpus):
    settings = CpuSettings(intra_op_threads=5, inter_op_threads=1, omp_num_threads=3, onednn=False,
                           kmp_blocktime=0, kmp_affinity="disabled")
    plan = cpu.plan_threads(settings, local_ranks=2, cores=8, openmp="libomp.so")
    assert (plan.intra_op, plan.inter_op) == (5, 1)
    assert plan.env == {"TF_ENABLE_ONEDNN_OPTS": "0", "OMP_NUM_THREADS": "3", "KMP_BLOCKTIME": "0",
                        "KMP_AFFINITY": "disabled", "TF_NUM_INTRAOP_THREADS": "5", "TF_NUM_INTEROP_THREADS": "1"}
    assert "intra_op=5 inter_op=1" in plan.describe()


def test_local_ranks_come_from_the_launcher(monkeypatch):
    for key in ("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        monkeypatch.delenv(key, raising=False)
    assert cpu.local_ranks_from_environment() == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4")
    assert cpu.local_ranks_from_environment() == 4
    monkeypatch.setenv("HOROVOD_LOCAL_SIZE", "2")
    assert cpu.local_ranks_from_environment() == 2


def test_parameter_server_tasks_get_at_least_two_inter_op_threads(unbound_16_cpus):
    one = CpuSettings(inter_op_threads=1)
    assert cpu.plan_threads(one, cores=8).inter_op == 1  # single/Horovod: as configured
    plan = cpu.plan_threads(one, cores=8, cluster_task=True)
    assert plan.inter_op == 2 and plan.env["TF_NUM_INTEROP_THREADS"] == "2"
    assert cpu.plan_threads(CpuSettings(inter_op_threads=4), cores=8, cluster_task=True).inter_op == 4


# ---------------------------------------------------------------- KMP_* only where an OpenMP runtime reads them

def test_kmp_variables_only_with_an_openmp_runtime_that_reads_them(unbound_16_cpus):
    for runtime in (None, "libgomp.so.1"):  # none, or GNU's (which has no KMP_* variables)
        plan = cpu.plan_threads(CpuSettings(), cores=8, openmp=runtime)
        assert not [k for k in plan.env if k.startswith("KMP_")] and "KMP" not in plan.describe()
        assert plan.env["OMP_NUM_THREADS"] == "8" and plan.env["TF_NUM_INTRAOP_THREADS"] == "8"  # these stay
    for runtime in ("libiomp5.so", "libomp.so.5"):
        assert cpu.plan_threads(CpuSettings(), cores=8, openmp=runtime).env["KMP_BLOCKTIME"] == "1"


def test_stock_tensorflow_links_no_openmp_runtime():
    """readelf -d on the installed TensorFlow's libraries, done by the module's own ELF reader."""
    import importlib.util
    import os
    import shutil
    import subprocess

    folder = os.path.dirname(importlib.util.find_spec("tensorflow").origin)
    framework = os.path.join(folder, "libtensorflow_framework.so.2")
    needed = cpu.needed_libraries(framework)
    assert "libc.so.6" in needed and not [n for n in needed if "omp" in n]
    if shutil.which("readelf"):
        out = subprocess.run(["readelf", "-d", framework], capture_output=True, text=True, timeout=60).stdout
        assert needed == [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]
    assert cpu.openmp_runtime() is None  # tensorflow-cpu 2.15: oneDNN on Eigen's thread pool
    assert not [k for k in cpu.plan_threads(CpuSettings()).env if k.startswith("KMP_")]


def test_an_openmp_runtime_is_found_in_a_tensorflow_that_links_one(tmp_path):
    """A stand-in TensorFlow folder whose framework library needs libiomp5 (built with the C
    compiler, as Intel's MKL builds are linked), and one that needs GNU's libgomp."""
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    (tmp_path / "empty.c").write_text("int unet_train_probe(void) { return 0; }\n")
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    subprocess.run([cc, "-shared", "-fPIC", "-o", runtime / "libiomp5.so", tmp_path / "empty.c"], check=True,
                   timeout=60)
    intel = tmp_path / "intel"
    intel.mkdir()
    subprocess.run([cc, "-shared", "-fPIC", "-o", intel / "libtensorflow_framework.so.2", tmp_path / "empty.c",
                    "-Wl,--no-as-needed", f"-L{runtime}", "-liomp5"], check=True, timeout=60)
    assert cpu.openmp_runtime(str(intel)) == "libiomp5.so"
    gnu = tmp_path / "gnu"
    gnu.mkdir()
    subprocess.run([cc, "-shared", "-fPIC", "-fopenmp", "-o", gnu / "libtensorflow_cc.so.2", tmp_path / "empty.c",
                    "-Wl,--no-as-needed", "-lgomp"], check=True, timeout=60)
    assert cpu.openmp_runtime(str(gnu)).startswith("libgomp")
    assert cpu.openmp_runtime(str(tmp_path / "missing")) is None
    assert cpu.needed_libraries(str(tmp_path / "empty.c")) == []  # not an ELF file
