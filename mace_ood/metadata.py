"""Metadata from structure names (and ``atoms.info``) for the report columns.

Names like ``cellrelaxed_LLZO_Li6.25Al0.25La3Zr2O12_T300K_step120`` become
``relaxation=cellrelaxed, system=LLZO, composition=Li6.25Al0.25La3Zr2O12,
temperature_K=300, step=120``. Unparsed names simply give empty columns.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from ase.data import chemical_symbols

RELAXATION_KINDS = (
    "cellrelaxed", "cell_relaxed", "fullrelaxed", "unrelaxed", "relaxed", "prerelaxed",
    "aimd", "md", "nvt", "npt", "nve", "sp", "singlepoint", "opt", "neb",
)
STRUCTURE_KINDS = (
    "bulk", "slab", "surface", "vacancy", "interstitial", "cluster", "nanoparticle",
    "gb", "interface", "amorphous", "liquid", "melt", "strained", "defect", "molecule",
)
_TEMPERATURE_TOKEN = re.compile(
    r"^(?:T[=_-]?(?P<a>\d+(?:\.\d+)?)K?|(?P<b>\d+(?:\.\d+)?)K)$", re.IGNORECASE
)
_STEP = re.compile(r"(?i)(?:^|[_\-.\s])(?P<kind>step|frame|iter|snapshot|snap|image)[_=-]?(?P<n>\d+)")
_FORMULA = re.compile(r"^(?:[A-Z][a-z]?(?:\d+(?:\.\d+)?)?)+$")
_FORMULA_PART = re.compile(r"([A-Z][a-z]?)(\d+(?:\.\d+)?)?")
_SYSTEM = re.compile(r"^[A-Z][A-Z0-9]{1,9}$")
_TOKEN_SPLIT = re.compile(r"[_\s,;]+|-(?![\d.])")
_STRAIN = re.compile(r"(?i)strain[_=]?(?P<value>[+-]?\d+(?:\.\d+)?)(?P<pct>pct|%)?")
_FILE_NAMES = {"POSCAR", "CONTCAR", "OUTCAR", "XDATCAR", "VASPRUN", "CHGCAR"}
_INFO_SKIP = {"energy", "free_energy", "stress", "virial", "forces"}


def _is_formula(token: str) -> bool:
    if not _FORMULA.match(token):
        return False
    return all(symbol in chemical_symbols[1:] for symbol, _ in _FORMULA_PART.findall(token))


def parse_name(name: str, extra_patterns: Iterable[str] = ()) -> dict[str, Any]:
    """Metadata fields found in a structure or file name.

    Parameters
    ----------
    name
        A file stem or structure id (``label@frame`` ids are fine).
    extra_patterns
        Regexes with named groups; every group that matches becomes a field (and wins over
        the built-in fields of the same name). Numeric strings become numbers.
    """
    fields: dict[str, Any] = {}
    base = name.split("@", 1)[0]
    tokens = [t for t in _TOKEN_SPLIT.split(base) if t]
    for token in tokens:
        lower = token.lower()
        if "relaxation" not in fields and lower in RELAXATION_KINDS:
            fields["relaxation"] = lower.replace("_", "")
            continue
        if "structure_kind" not in fields and lower in STRUCTURE_KINDS:
            fields["structure_kind"] = lower
            continue
        match = _TEMPERATURE_TOKEN.match(token)
        if match and "temperature_K" not in fields:
            fields["temperature_K"] = _number(match.group("a") or match.group("b"))
            continue
        if "composition" not in fields and _is_formula(token) and not token.isupper():
            fields["composition"] = token
            continue
        if "system" not in fields and _SYSTEM.match(token) and not _is_formula(token) and token not in _FILE_NAMES:
            fields["system"] = token
            continue
        if "composition" not in fields and _is_formula(token):
            fields["composition"] = token
    for match in _STEP.finditer(base):
        key = {"snap": "snapshot", "image": "image"}.get(match.group("kind").lower(), match.group("kind").lower())
        fields.setdefault(key, int(match.group("n")))
    strain = _STRAIN.search(base)
    if strain:
        value = float(strain.group("value"))
        fields["strain"] = value / 100 if strain.group("pct") else value
    for pattern in extra_patterns:
        for match in re.finditer(pattern, name):
            for key, value in match.groupdict().items():
                if value is not None:
                    fields[key] = _number(value)
    return fields


def info_fields(info: Mapping[str, Any]) -> dict[str, Any]:
    """Scalar ``atoms.info`` entries as ``info_<key>`` columns."""
    out: dict[str, Any] = {}
    for key, value in info.items():
        if key in _INFO_SKIP:
            continue
        if hasattr(value, "item") and getattr(value, "size", 2) == 1:
            value = value.item()
        if isinstance(value, (str, int, float, bool)):
            out[f"info_{key}"] = value
    return out


def _number(text: str) -> Any:
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text else value
