"""Precision policy: auto picks per CPU flags, oneDNN ISA cap and oneDNN setting; emulated requests are refused.

The hardware is injected (flags, environment, GPU), so these tests do not depend on the CPU they run on.
"""
from __future__ import annotations

import logging

import pytest

from trainer.config.loader import load_settings
from trainer.errors import ConfigError
from trainer.hardware.cpu import cpu_flags, native_bf16_support, onednn_isa_cap
from trainer.hardware.precision import Hardware, choose_precision, resolve_precision

SAPPHIRE_RAPIDS = frozenset({"sse4_1", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile"})
EPYC_GENOA = frozenset({"sse4_1", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"})
EPYC_AVX2 = frozenset({"sse4_1", "avx", "avx2", "fma"})
SKYLAKE_AVX512 = frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni"})  # AVX-512 but no bf16


def cpu(flags, onednn=True, **env) -> Hardware:
    return Hardware(gpu=False, cpu_flags=flags, onednn=onednn, env=env)


@pytest.mark.parametrize("flags", [SAPPHIRE_RAPIDS, EPYC_GENOA])
def test_auto_picks_bf16_on_cpus_with_native_bf16(flags):
    choice = choose_precision("auto", cpu(flags))
    assert (choice.name, choice.policy) == ("bf16", "mixed_bfloat16")
    assert "avx512_bf16" in choice.reason and "oneDNN max ISA unrestricted" in choice.reason


def test_the_logged_reason_names_every_bf16_flag_present():
    choice = choose_precision("auto", cpu(SAPPHIRE_RAPIDS))
    assert choice.describe() == ("precision: mixed_bfloat16 (auto: avx512_bf16+amx_bf16 present, "
                                 "oneDNN max ISA unrestricted)")


@pytest.mark.parametrize("flags", [EPYC_AVX2, SKYLAKE_AVX512, frozenset()])
def test_auto_picks_fp32_without_bf16_flags(flags):
    choice = choose_precision("auto", cpu(flags))
    assert choice.policy == "float32"
    assert "no avx512_bf16/amx_bf16 in the CPU flags" in choice.reason


@pytest.mark.parametrize("isa", ["AVX2", "avx2", "AVX512_CORE", "AVX512_CORE_VNNI", "SSE41", "AVX2_VNNI_2"])
def test_an_isa_cap_below_bf16_makes_auto_pick_fp32_although_the_cpu_has_bf16(isa):
    choice = choose_precision("auto", cpu(SAPPHIRE_RAPIDS, ONEDNN_MAX_CPU_ISA=isa))
    assert choice.policy == "float32"
    assert f"ONEDNN_MAX_CPU_ISA={isa.upper()} caps oneDNN below AVX512_CORE_BF16" in choice.reason


@pytest.mark.parametrize("isa", ["AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX10_1_512_AMX", "DEFAULT", "ALL"])
def test_an_isa_cap_at_or_above_bf16_keeps_bf16(isa):
    choice = choose_precision("auto", cpu(SAPPHIRE_RAPIDS, ONEDNN_MAX_CPU_ISA=isa))
    assert choice.policy == "mixed_bfloat16" and f"ONEDNN_MAX_CPU_ISA={isa}" in choice.reason


def test_the_older_dnnl_variable_counts_and_the_onednn_one_wins():
    assert choose_precision("auto", cpu(SAPPHIRE_RAPIDS, DNNL_MAX_CPU_ISA="AVX2")).policy == "float32"
    both = cpu(SAPPHIRE_RAPIDS, ONEDNN_MAX_CPU_ISA="AVX512_CORE_AMX", DNNL_MAX_CPU_ISA="AVX2")
    assert choose_precision("auto", both).policy == "mixed_bfloat16"
    assert onednn_isa_cap({"ONEDNN_MAX_CPU_ISA": " ", "DNNL_MAX_CPU_ISA": "avx2"}).describe() == "DNNL_MAX_CPU_ISA=AVX2"


def test_an_unrecognised_isa_value_is_not_trusted_for_bf16():
    choice = choose_precision("auto", cpu(SAPPHIRE_RAPIDS, ONEDNN_MAX_CPU_ISA="AVX9000"))
    assert choice.policy == "float32" and "ONEDNN_MAX_CPU_ISA=AVX9000 is not a oneDNN ISA name" in choice.reason


def test_onednn_off_means_no_native_bf16():
    choice = choose_precision("auto", cpu(SAPPHIRE_RAPIDS, onednn=False))
    assert choice.policy == "float32" and "oneDNN is off (cpu.onednn: false)" in choice.reason
    with pytest.raises(ConfigError, match="oneDNN is off"):
        choose_precision("bf16", cpu(SAPPHIRE_RAPIDS, onednn=False))


def test_auto_picks_fp16_on_gpus_whatever_the_cpu():
    for flags in (EPYC_AVX2, SAPPHIRE_RAPIDS):
        choice = choose_precision("auto", Hardware(gpu=True, cpu_flags=flags, onednn=True))
        assert choice.policy == "mixed_float16" and choice.reason == "auto: GPU present"


def test_explicit_bf16_is_refused_on_an_avx2_only_cpu_with_the_reason():
    with pytest.raises(ConfigError) as caught:
        choose_precision("bf16", cpu(EPYC_AVX2))
    message = str(caught.value)
    assert message.startswith("train.precision=bf16 refused: no avx512_bf16/amx_bf16 in the CPU flags")
    assert "train.precision=auto or fp32" in message and "\n" not in message


def test_explicit_bf16_is_refused_when_the_isa_cap_hides_it():
    with pytest.raises(ConfigError, match="ONEDNN_MAX_CPU_ISA=AVX2 caps oneDNN below AVX512_CORE_BF16"):
        choose_precision("bf16", cpu(SAPPHIRE_RAPIDS, ONEDNN_MAX_CPU_ISA="AVX2"))
    assert choose_precision("bf16", cpu(SAPPHIRE_RAPIDS)).policy == "mixed_bfloat16"


def test_fp16_needs_a_gpu_and_fp32_is_always_granted():
    with pytest.raises(ConfigError, match="fp16 refused: no GPU"):
        choose_precision("fp16", cpu(SAPPHIRE_RAPIDS))
    assert choose_precision("fp16", Hardware(gpu=True, cpu_flags=frozenset(), onednn=True)).policy == "mixed_float16"
    for hardware in (cpu(EPYC_AVX2), cpu(SAPPHIRE_RAPIDS), Hardware(True, frozenset(), True)):
        assert choose_precision("fp32", hardware).policy == "float32"


def test_the_refusal_names_the_key_it_came_from():
    with pytest.raises(ConfigError, match=r"^--precision=bf16 refused"):
        choose_precision("bf16", cpu(EPYC_AVX2), key="--precision")


def test_the_decision_and_the_refusal_are_logged(caplog):
    caplog.set_level(logging.INFO, logger="trainer.hardware.precision")
    resolve_precision("auto", True, hardware=cpu(SAPPHIRE_RAPIDS))
    assert "precision: mixed_bfloat16 (auto: avx512_bf16+amx_bf16 present, oneDNN max ISA unrestricted)" \
        in caplog.messages
    with pytest.raises(ConfigError):
        resolve_precision("bf16", True, hardware=cpu(SAPPHIRE_RAPIDS, ONEDNN_MAX_CPU_ISA="AVX2"))
    assert any(r.levelno == logging.ERROR and "caps oneDNN below AVX512_CORE_BF16" in r.getMessage()
               for r in caplog.records)


def test_cpu_flags_are_read_from_the_flags_line():
    cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\nbugs\t: spectre\n"
    assert cpu_flags(cpuinfo) == frozenset({"fpu", "avx2", "avx512_bf16", "amx_bf16"})
    assert cpu_flags("processor\t: 0\n") == frozenset()
    assert native_bf16_support(cpu_flags(cpuinfo), onednn=True, env={}).native


def test_settings_default_is_auto_and_the_old_boolean_key_points_to_the_new_one():
    assert load_settings(None).train.precision == "auto"
    assert load_settings(None, ["train.precision=fp32"]).train.precision == "fp32"
    for old in ("true", "false"):
        with pytest.raises(ConfigError) as caught:
            load_settings(None, [f"train.mixed_precision={old}"])
        assert "train.mixed_precision" in str(caught.value) and "replaced by train.precision" in str(caught.value)
    with pytest.raises(ConfigError, match="train.precision"):
        load_settings(None, ["train.precision=half"])
