from __future__ import annotations

from pathlib import Path

import pytest

from client.data.site_config import load_site_config, parse_site_yaml
from shared_model.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    cfg = load_site_config(_write(tmp_path, "site_name: a_site\ndataset_dir: data\n"))
    assert cfg.dataset_dir == (tmp_path / "data").resolve()
    assert cfg.run_dir == (tmp_path / "runs" / "a_site").resolve()
    assert (cfg.role, cfg.adc_unit, cfg.min_cases, cfg.device) == (
        "train",
        "1e-3",
        10,
        "auto",
    )
    assert cfg.val_fraction == 0.2 and cfg.privacy is None and cfg.adc_scale == 1.0


def test_all_problems_are_reported_in_one_pass(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "site_name: West China\nrole: trainer\nadc_unit: mm2\n"
        "min_cases: 0\nval_fraction: 1.5\nseed: 3\ndevice: tpu\n",
    )
    config, problems = parse_site_yaml(path)
    assert config is None
    keys = {p.where for p in problems}
    assert keys >= {
        "site_name",
        "role",
        "adc_unit",
        "min_cases",
        "val_fraction",
        "seed",
        "device",
        "dataset_dir",
    }
    unknown = next(p for p in problems if p.where == "seed")
    assert "unknown key" in unknown.message and "split_seed" in unknown.fix


def test_error_names_the_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "site_name: a\ndataset_dir: nowhere\n")
    with pytest.raises(
        ConfigError, match=r"(?s)site\.yaml.*dataset_dir.*does not exist"
    ):
        load_site_config(path)


def test_yaml_syntax_error_gives_line(tmp_path: Path) -> None:
    _, problems = parse_site_yaml(_write(tmp_path, "site_name: a\n  dataset_dir: [x\n"))
    assert problems[0].where == "(syntax)" and "line" in problems[0].message


def test_run_dir_inside_dataset_is_refused(tmp_path: Path) -> None:
    _, problems = parse_site_yaml(
        _write(tmp_path, "site_name: a\ndataset_dir: data\nrun_dir: data/runs\n")
    )
    assert [p.where for p in problems] == ["run_dir"]


@pytest.mark.parametrize(
    ("privacy", "key"),
    [
        (
            "{target_epsilon: -1, delta: 1.0e-5, max_grad_norm: 1}",
            "privacy.target_epsilon",
        ),
        ("{target_epsilon: 8, delta: 1.5, max_grad_norm: 1}", "privacy.delta"),
        ("{target_epsilon: 8, delta: 1.0e-5}", "privacy.max_grad_norm"),
        (
            "{target_epsilon: 8, delta: 1.0e-5, max_grad_norm: 1, noise: 2}",
            "privacy.noise",
        ),
    ],
)
def test_privacy_is_validated(tmp_path: Path, privacy: str, key: str) -> None:
    _, problems = parse_site_yaml(
        _write(tmp_path, f"site_name: a\ndataset_dir: data\nprivacy: {privacy}\n")
    )
    assert [p.where for p in problems] == [key]


def test_valid_privacy(tmp_path: Path) -> None:
    cfg = load_site_config(
        _write(
            tmp_path,
            "site_name: a\ndataset_dir: data\nprivacy:\n"
            "  target_epsilon: 8\n  delta: 1.0e-5\n  max_grad_norm: 1.0\n",
        )
    )
    assert cfg.privacy is not None and cfg.privacy.target_epsilon == 8.0


def test_example_site_configs_follow_the_schema() -> None:
    """The examples are schema-valid; only their data paths are missing here."""
    folder = Path(__file__).resolve().parents[2] / "site_configs"
    examples = sorted(folder.glob("*.yaml"))
    assert {p.stem for p in examples} == {
        "training_site",
        "nct_site",
        "prospective_site",
    }
    for path in examples:
        _, problems = parse_site_yaml(path)
        assert [p.where for p in problems] == ["dataset_dir"], problems


def test_the_one_writer_writes_what_the_parser_reads(tmp_path: Path) -> None:
    from client.data.site_config import write_site_yaml

    (tmp_path / "data").mkdir()
    values = {
        "site_name": "west_china",
        "dataset_dir": "data",
        "adc_unit": "1e-6",
        "min_cases": 3,
        "privacy": {"target_epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0},
    }
    path = write_site_yaml(tmp_path / "s.yaml", values, comment="made here")
    text = path.read_text()
    assert text.startswith("# made here\n") and 'adc_unit: "1e-6"' in text
    config, problems = parse_site_yaml(path)
    assert not problems and config is not None
    assert config.adc_unit == "1e-6" and config.min_cases == 3
    assert config.privacy is not None and config.privacy.delta == 1e-5
    with pytest.raises(ConfigError, match="unknown site YAML keys"):
        write_site_yaml(tmp_path / "t.yaml", {**values, "seed": 1})


def test_no_other_module_writes_a_site_yaml() -> None:
    root = Path(__file__).resolve().parents[2]
    writers = sorted(
        str(p.relative_to(root))
        for package in (
            "shared_model",
            "wire",
            "client",
            "server",
            "simulations",
            "cli",
        )
        for p in (root / package).rglob("*.py")
        if "yaml.safe_dump" in p.read_text() or "yaml.dump" in p.read_text()
    )
    assert writers == ["client/data/site_config.py"]
