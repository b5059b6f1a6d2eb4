from __future__ import annotations

import numpy as np
import pytest

from mace_ood.metadata import info_fields, parse_name

NAMES = [
    ("cellrelaxed_LLZO_Li6.25Al0.25La3Zr2O12_T300K_step120",
     {"relaxation": "cellrelaxed", "system": "LLZO", "composition": "Li6.25Al0.25La3Zr2O12",
      "temperature_K": 300, "step": 120}),
    ("md_Cu32_T300K_strain+1pct@17", {"relaxation": "md", "composition": "Cu32", "temperature_K": 300, "strain": 0.01}),
    ("slab_Cu36_111_T=600K", {"structure_kind": "slab", "composition": "Cu36", "temperature_K": 600}),
    ("vacancy_Cu31_1200K", {"structure_kind": "vacancy", "composition": "Cu31", "temperature_K": 1200}),
    ("LLZO_relaxed", {"system": "LLZO", "relaxation": "relaxed"}),
    ("unrelaxed-Li7La3Zr2O12-frame5", {"relaxation": "unrelaxed", "composition": "Li7La3Zr2O12", "frame": 5}),
    ("H2O_T300", {"composition": "H2O", "temperature_K": 300}),
    ("KCl_T500K_nvt", {"composition": "KCl", "temperature_K": 500, "relaxation": "nvt"}),
    ("POSCAR", {}),
    ("structure", {}),
    ("aimd_LiPS_T=800.5K_iter3", {"relaxation": "aimd", "composition": "LiPS", "temperature_K": 800.5, "iter": 3}),
]


@pytest.mark.parametrize(("name", "expected"), NAMES)
def test_names(name, expected):
    assert parse_name(name) == expected


def test_user_patterns_override_and_convert_numbers():
    fields = parse_name("run3_x0.25_T300K", [r"x(?P<x>[\d.]+)", r"run(?P<run>\d+)", r"T(?P<temperature_K>\d+)K"])
    assert fields["x"] == 0.25 and fields["run"] == 3 and fields["temperature_K"] == 300


def test_info_fields_keep_scalars_only():
    info = {"temperature_K": 300.0, "config_type": "md", "energy": -3.0, "arr": np.zeros(3), "n": np.int64(4)}
    assert info_fields(info) == {"info_temperature_K": 300.0, "info_config_type": "md", "info_n": 4}
