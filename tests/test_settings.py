"""settings.yaml schema, loader, overrides and the `config show` command."""
from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml

from trainer.config.loader import load_settings, settings_to_yaml
from trainer.config.settings import Settings
from trainer.errors import ConfigError, UserError

REPO_SETTINGS = Path(__file__).resolve().parent.parent / "settings.yaml"


def _key_paths(tree: dict, prefix: str = "") -> set[str]:
    paths = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        paths.add(path)
        if isinstance(value, dict):
            paths |= _key_paths(value, path + ".")
    return paths


# ---------------------------------------------------------------- defaults and the shipped file

def test_defaults_load_without_a_file():
    settings = load_settings(None)
    assert isinstance(settings, Settings)
    assert settings == Settings()
    assert settings.train.epochs == 10
    assert settings.data.channels == ("flair", "t1", "t1ce", "t2")
    assert settings.run_path == Path("runs") / "default"


def test_repository_settings_yaml_exists_and_is_a_mapping():
    assert REPO_SETTINGS.is_file(), REPO_SETTINGS
    raw = yaml.safe_load(REPO_SETTINGS.read_text())
    assert isinstance(raw, dict)
    assert set(raw) == {"data", "model", "train", "cpu", "cluster", "logging"}


def test_repository_settings_yaml_equals_the_defaults():
    # The file says "Every key is optional (defaults shown)".
    assert load_settings(REPO_SETTINGS) == Settings()


def test_repository_settings_yaml_keys_match_the_schema_exactly():
    raw = yaml.safe_load(REPO_SETTINGS.read_text())
    schema = Settings().model_dump(mode="json", by_alias=True)
    file_keys, schema_keys = _key_paths(raw), _key_paths(schema)
    assert file_keys - schema_keys == set(), "keys in settings.yaml that the schema does not know"
    assert schema_keys - file_keys == set(), "schema keys missing from settings.yaml's documentation"


# ---------------------------------------------------------------- overrides

def test_set_override_changes_only_that_key():
    settings = load_settings(REPO_SETTINGS, ["train.epochs=3"])
    assert settings.train.epochs == 3
    assert settings.model_copy(update={"train": settings.train.model_copy(update={"epochs": 10})}) == Settings()


def test_overrides_parse_yaml_values_and_beat_the_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("train:\n  epochs: 7\n  batch_size: 4\ndata:\n  image_size: 64\n")
    settings = load_settings(path, ["train.epochs=3", "data.channels=[flair, t2]", "cluster.async=true",
                                    "data.cache_volumes=false"])
    assert settings.train.epochs == 3               # --set beats the file
    assert settings.train.batch_size == 4           # file beats defaults
    assert settings.data.image_size == 64
    assert settings.data.channels == ("flair", "t2")
    assert settings.cluster.asynchronous is True
    assert settings.data.cache_volumes is False


def test_later_override_wins_and_flag_overrides_beat_set():
    settings = load_settings(None, ["train.epochs=3", "train.epochs=5"], {"train.batch_size": 2,
                                                                          "train.epochs": None})
    assert settings.train.epochs == 5
    assert settings.train.batch_size == 2


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_settings(None, ["train.epochs"])


# ---------------------------------------------------------------- rejections name the key

@pytest.mark.parametrize("override, key", [
    ("nonsense.value=1", "nonsense"),
    ("data.foo=1", "data.foo"),
    ("train.loss.nme=dice", "train.loss.nme"),
])
def test_unknown_keys_are_rejected_with_dotted_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_settings(None, [override])
    message = str(info.value)
    assert f"{key}:" in message
    assert "unknown key" in message


def test_unknown_key_in_file_is_rejected(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("model:\n  dropuot: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "model.dropuot" in str(info.value)
    assert str(path) in str(info.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError) as info:
        load_settings(None, ["train.epochs=abc"])
    message = str(info.value)
    assert "train.epochs" in message
    assert "abc" in message


@pytest.mark.parametrize("override, key, expected", [
    ("train.epochs=true", "train.epochs", "valid integer"),
    ("train.epochs=3.5", "train.epochs", "valid integer"),
    ("train.epochs=3.0", "train.epochs", "valid integer"),
    ("data.augment=1", "data.augment", "valid boolean"),
    ("data.augment=on_purpose", "data.augment", "valid boolean"),
    ("train.learning_rate=fast", "train.learning_rate", "valid number"),
    ("model.upsampling=7", "model.upsampling", "'transposed' or 'upsample'"),
])
def test_wrong_types_are_rejected_not_coerced(override, key, expected):
    with pytest.raises(ConfigError) as info:
        load_settings(None, [override])
    assert f"{key}: " in str(info.value) and expected in str(info.value)


def test_json_forms_still_fill_paths_tuples_and_floats():
    settings = load_settings(None, ["data.crop_size=[144,144,144]", "train.learning_rate=1",
                                    "train.run_dir=/tmp/somewhere"], {"train.run_name": "x"})
    assert settings.data.crop_size == (144, 144, 144)
    assert settings.train.learning_rate == 1.0 and isinstance(settings.train.learning_rate, float)
    assert settings.train.run_dir == Path("/tmp/somewhere")


@pytest.mark.parametrize("overrides, key", [
    (["cpu.inter_op_threads=0"], "cpu.inter_op_threads"),
    (["data.crop_size=[60,64,64]"], "data.crop_size"),
    (["data.split.val_fraction=0.6", "data.split.test_fraction=0.5"], "data.split"),
    (["data.image_size=100"], "data.image_size"),
    (["cluster.ssh_port=70000"], "cluster.ssh_port"),
    (["cluster.worker_hosts=[nohost]"], "cluster.worker_hosts"),
    (["data.channels=[flair, flair]"], "data.channels"),
    (["model.upsampling=bicubic"], "model.upsampling"),
])
def test_out_of_range_values_are_rejected(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_settings(None, overrides)
    assert f"{key}:" in str(info.value)


def test_split_fractions_that_fit_are_accepted():
    settings = load_settings(None, ["data.split.val_fraction=0.4", "data.split.test_fraction=0.5"])
    assert settings.data.split.val_fraction == 0.4


@pytest.mark.parametrize("value", ["/k;touch /tmp/PWNED;#", "/keys/id rsa", "/keys/$(id)", "keys/id", "~/.ssh/id",
                                   "/keys/`id`", "/keys/'q'"])
def test_ssh_key_must_be_a_plain_absolute_path(value):
    """horovodrun pastes `-i KEY` unquoted into a /bin/sh command: only known_hosts_file's path characters."""
    with pytest.raises(ConfigError) as info:
        load_settings(None, [f"cluster.ssh_key={value}"])
    assert "cluster.ssh_key:" in str(info.value) and "absolute path" in str(info.value)


def test_plain_ssh_key_paths_are_accepted():
    settings = load_settings(None, ["cluster.ssh_key=/home/alice/.ssh/id_ed25519"])
    assert settings.cluster.ssh_key == Path("/home/alice/.ssh/id_ed25519")
    assert load_settings(None, ["cluster.ssh_key=null"]).cluster.ssh_key is None


@pytest.mark.parametrize("value", ["../../etc/cron.d/x", "/tmp/train.log", "logs/train.log", "..", ".", "a b.log"])
def test_log_file_must_be_a_file_name(value):
    with pytest.raises(ConfigError) as info:
        load_settings(None, [f"logging.log_file={value}"])
    assert "logging.log_file:" in str(info.value) and "file name" in str(info.value)


def test_host_name_duplicates_found_in_linear_time():
    """50 000 hosts: list.count made this quadratic (seconds); a Counter takes milliseconds."""
    import time

    from trainer.config.settings import check_host_names

    hosts = tuple(f"node{i}" for i in range(50_000)) + ("node7",)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="'node7' is listed twice"):
        check_host_names(hosts)
    assert time.perf_counter() - start < 2.0


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, UserError)
    assert ConfigError.exit_code == 2


# ---------------------------------------------------------------- malformed files

def test_malformed_yaml_reports_line_number(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: 3\n\tbatch_size: 4\n")  # a tab cannot start a token (line 3)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 3" in message


def test_unclosed_flow_sequence_reports_a_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  crop_size: [64, 64\nmodel:\n  dropout: 0.1\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+"):
        load_settings(path)


def test_yaml_list_at_top_level_is_rejected(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- data\n- model\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "list" in str(info.value)
    assert "mapping" in str(info.value)


def test_empty_yaml_means_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert load_settings(path) == Settings()


def test_missing_settings_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.yaml")


def test_section_given_a_scalar_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="'train' is a value, not a section"):
        load_settings(None, ["train=5", "train.epochs=3"])


# ---------------------------------------------------------------- immutability

def test_settings_are_frozen():
    settings = load_settings(None)
    with pytest.raises(pydantic.ValidationError):
        settings.train.epochs = 99  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        settings.data = settings.data  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        settings.cluster.asynchronous = True  # type: ignore[misc]
    assert settings.train.epochs == 10


# ---------------------------------------------------------------- YAML round trip

def test_settings_to_yaml_round_trips(tmp_path):
    settings = load_settings(None, ["train.epochs=3", "cluster.async=true", "data.channels=[t1ce]",
                                    "cluster.ssh_key=/keys/id", "train.schedule.min_lr=2.5e-7"])
    path = tmp_path / "dump.yaml"
    path.write_text(settings_to_yaml(settings))
    assert load_settings(path) == settings
    assert yaml.safe_load(path.read_text())["cluster"]["async"] is True


# ---------------------------------------------------------------- CLI

def test_cli_config_show_round_trips(run_cli, tmp_path):
    result = run_cli("config", "show", "--set", "train.epochs=3", "--set", "data.channels=[flair,t2]",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    shown = tmp_path / "shown.yaml"
    shown.write_text(result.stdout)
    expected = load_settings(None, ["train.epochs=3", "data.channels=[flair,t2]"])
    assert load_settings(shown) == expected
    assert yaml.safe_load(result.stdout)["train"]["epochs"] == 3


def test_cli_config_show_reads_settings_file(run_cli, tmp_path):
    path = tmp_path / "custom.yaml"
    path.write_text("train:\n  run_name: from-file\n")
    result = run_cli("config", "show", "--settings", path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["train"]["run_name"] == "from-file"


def test_cli_picks_up_settings_yaml_in_cwd(run_cli, tmp_path):
    (tmp_path / "settings.yaml").write_text("model:\n  dropout: 0.35\n")
    result = run_cli("config", "show", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["model"]["dropout"] == 0.35


def test_cli_config_show_in_repo_matches_settings_yaml(run_cli):
    result = run_cli("config", "show", cwd=REPO_SETTINGS.parent)
    assert result.returncode == 0, result.stderr
    assert Settings.model_validate(yaml.safe_load(result.stdout)) == load_settings(REPO_SETTINGS)


@pytest.mark.parametrize("override, key", [
    ("train.epochs=abc", "train.epochs"),
    ("data.foo=1", "data.foo"),
    ("cpu.inter_op_threads=0", "cpu.inter_op_threads"),
])
def test_cli_bad_override_exits_2_with_one_error_line(run_cli, tmp_path, override, key):
    result = run_cli("config", "show", "--set", override, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "error:" in lines[0]
    assert key in lines[0]
    assert result.stdout == ""


def test_cli_malformed_settings_file_exits_2(run_cli, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: 3\n\tbatch_size: 4\n")
    result = run_cli("config", "show", "--settings", path, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "line 3" in result.stderr


@pytest.mark.parametrize("old, new", [("brats_dir", "data.source"), ("decathlon_dir", "data.source"),
                                      ("slices_h5", "data.dataset"), ("decathlon_split", "data.dataset"),
                                      ("cache_dir", "data.cache_volumes")])
def test_a_layout_named_data_key_is_refused_naming_its_new_name(old, new, tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_settings(None, [f"data.{old}=somewhere"])
    message = str(caught.value)
    assert f"data.{old}" in message and f"replaced by {new}" in message and len(message.splitlines()) == 1
