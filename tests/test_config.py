from __future__ import annotations

import pytest
import yaml

from mace_ood.config import ConfigError, config_from_dict, load_config

BASE = {
    "output_dir": "out",
    "datasets": {"T1": ["a.xyz"], "T2": ["b.xyz"], "T3": ["c.xyz"]},
    "model_families": {
        "F1": {"trained_on": "T1", "models": ["m1_*.model"]},
        "F2": {"trained_on": "T2", "models": ["m2_*.model"]},
    },
}


def test_defaults_and_cross_pairs():
    config = config_from_dict({**BASE, "reference": False})
    assert config.select.top_k == 30 and config.default_dtype == "float64" and config.device == "auto"
    assert config.evaluation_pairs() == [
        ("F1", "T2", False), ("F1", "T3", False), ("F2", "T1", False), ("F2", "T3", False),
    ]


def test_reference_adds_own_training_set():
    pairs = config_from_dict(BASE).evaluation_pairs()
    assert ("F1", "T1", True) in pairs and ("F2", "T2", True) in pairs and len(pairs) == 6


def test_explicit_evaluations():
    config = config_from_dict({**BASE, "reference": False, "evaluations": [{"family": "F1", "dataset": "T1"}, {"family": "F2", "dataset": "T3"}]})
    assert config.evaluation_pairs() == [("F1", "T1", True), ("F2", "T3", False)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"select": {"top_k": 3, "topk": 4}}, "unknown key 'select.topk'"),
        ({"model_families": {"F1": {"trained_on": "T1", "models": ["x"], "seed": 1}}}, "unknown key 'model_families.F1.seed'"),
        ({"model_families": {"F1": {"trained_on": "T9", "models": ["x"]}}}, "unknown dataset 'T9'"),
        ({"evaluations": [{"family": "F7", "dataset": "T1"}]}, "unknown family 'F7'"),
        ({"default_dtype": "float16"}, "default_dtype"),
        ({"device": "tpu"}, "device"),
        ({"select": {"top_k": 0}}, "select.top_k"),
        ({"metadata": {"patterns": ["(\\d+)K"]}}, "no named group"),
        ({"metadata": {"patterns": ["(?P<x>"]}}, "not a valid regex"),
        ({"dask": {"n_workers": 2, "address": "tcp://x:1"}}, "not both"),
        ({"forces": False, "select": {"score": "force_deviation_max"}}, "needs `forces: true`"),
        ({"select": {"score": "vibes"}}, "select.score"),
        # configs that used to fail only at report time, after all the compute
        ({"forces": False, "select": {"combine": ["force_deviation_mean"]}}, "select.combine: none of force_deviation_mean"),
        ({"select": {"score": "gmm_nll"}, "scores": {"gmm_components": []}}, "needs a mixture"),
        ({"select": {"combine": ["gmm_nll_max"]}, "scores": {"gmm_components": []}}, "select.combine: none of"),
    ],
)
def test_bad_configs_name_the_problem(change, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict({**BASE, **change}, source="c.yaml")
    assert message in str(info.value) and str(info.value).startswith("c.yaml:")
    assert "\n" not in str(info.value)


def test_missing_key_is_named():
    data = dict(BASE)
    del data["datasets"]
    with pytest.raises(ConfigError, match="missing key 'datasets'"):
        config_from_dict(data)


def test_yaml_paths_are_relative_to_the_file(tmp_path):
    path = tmp_path / "sub" / "config.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(BASE))
    config = load_config(path, overrides={"batch_size": 2, "device": None})
    assert config.datasets["T1"] == [str(path.parent / "a.xyz")]
    assert config.model_families["F1"].models == [str(path.parent / "m1_*.model")]
    assert config.output_dir == path.parent / "out"
    assert config.batch_size == 2 and config.device == "auto"


def test_environment_variables_in_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("OOD_SCRATCH", str(tmp_path / "scratch"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**BASE, "output_dir": "$OOD_SCRATCH/run"}))
    assert load_config(path).output_dir == tmp_path / "scratch" / "run"


def test_unreadable_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("datasets: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_combined_keeps_what_this_config_computes():
    config = config_from_dict({**BASE, "select": {"combine": ["force_deviation_mean", "mahalanobis_max"]}})
    assert config.select.score == "combined" and config.forces  # the default a user gets: forces on
    config = config_from_dict({**BASE, "forces": False, "select": {"combine": ["force_deviation_mean", "mahalanobis_max"]}})
    assert config.select.score == "combined" and not config.forces  # the latent component is enough
