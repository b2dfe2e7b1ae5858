"""bpf/netoken.h and netoken/layout.py describe the same bytes.

The C side is read from BTF, i.e. from what clang actually laid out: the
structs from the production objects (their maps and programs use them), and
the enums from a small anchor compiled from the same header, because enum
types that only supply constants are not emitted into BTF otherwise.
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from netoken import layout
from netoken.datapath import BPF_DIR

ROOT = Path(__file__).resolve().parents[2]


def btf_types(obj: Path) -> dict[str, dict]:
    out = subprocess.run(
        ["bpftool", "-j", "btf", "dump", "file", str(obj)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    types = json.loads(out)["types"]
    by_id = {t["id"]: t for t in types}
    named = {}
    for t in types:
        if t.get("name") and t["kind"] in ("STRUCT", "ENUM"):
            named.setdefault(t["name"], t)
    named["__by_id__"] = by_id
    return named


@pytest.fixture(scope="module")
def anchor_btf(tmp_path_factory) -> dict[str, dict]:
    clang = shutil.which("clang-19") or shutil.which("clang")
    assert clang, "clang is required (apt-get install clang-19)"
    d = tmp_path_factory.mktemp("anchor")
    src = d / "anchor.c"
    decls = [f"struct {name} anchor_{name};" for name in layout.STRUCTS]
    decls += [f"enum {name} anchor_{name};" for name in layout.ENUMS]
    src.write_text('#include "netoken.h"\n' + "\n".join(decls) + "\n")
    arch = subprocess.run(
        ["uname", "-m"], capture_output=True, text=True, check=True
    ).stdout.strip()
    obj = d / "anchor.o"
    subprocess.run(
        [
            clang,
            "-g",
            "-O2",
            "-target",
            "bpf",
            f"-I/usr/include/{arch}-linux-gnu",
            f"-I{ROOT / 'bpf'}",
            "-c",
            str(src),
            "-o",
            str(obj),
        ],
        check=True,
    )
    return btf_types(obj)


def production_objects() -> list[Path]:
    objs = sorted(BPF_DIR.glob("*.bpf.o"))
    assert objs, "no compiled BPF objects: run `make build`"
    return objs


def assert_struct_matches(btf: dict, name: str) -> None:
    py = layout.STRUCTS[name]
    t = btf[name]
    assert t["size"] == ctypes.sizeof(py), (
        f"struct {name}: C {t['size']} vs Python {ctypes.sizeof(py)}"
    )
    c_fields = [(m["name"], m["bits_offset"] // 8) for m in t["members"]]
    py_fields = [(f[0], getattr(py, f[0]).offset) for f in py._fields_]
    assert c_fields == py_fields, f"struct {name} fields differ"
    for m, f in zip(t["members"], py._fields_):
        size = ctypes.sizeof(f[1])
        assert _btf_size(btf, m["type_id"]) == size, f"{name}.{m['name']}: size differs"


def _btf_size(btf: dict, type_id: int) -> int:
    by_id = btf["__by_id__"]
    t = by_id[type_id]
    while t["kind"] in ("TYPEDEF", "VOLATILE", "CONST"):
        t = by_id[t["type_id"]]
    if t["kind"] == "ARRAY":
        return t["nr_elems"] * _btf_size(btf, t["type_id"])
    return t["size"]


def test_every_shared_struct_matches_the_header(anchor_btf):
    for name in layout.STRUCTS:
        assert_struct_matches(anchor_btf, name)


def test_structs_in_the_compiled_programs_match(anchor_btf):
    seen = set()
    for obj in production_objects():
        btf = btf_types(obj)
        for name in layout.STRUCTS:
            if name in btf:
                assert_struct_matches(btf, name)
                seen.add(name)
    # every struct a map is declared with must be in some object
    assert {"nt_config", "nt_key", "nt_policy", "nt_port_rules", "nt_lpm_v4", "nt_lpm_v6"} <= seen


def test_enums_match_the_header(anchor_btf):
    for name, (prefix, names) in layout.ENUMS.items():
        values = {v["name"]: v["val"] for v in anchor_btf[name]["values"]}
        expected = {prefix + n.upper(): i for i, n in enumerate(names)}
        assert values == expected, f"enum {name} differs"


def test_constants_match_the_header():
    # #defines are not in BTF: read them as the compiler does, from the text.
    text = (ROOT / "bpf" / "netoken.h").read_text()
    defines = dict(re.findall(r"^#define NT_([A-Z0-9_]+)\s+(\d+)\b", text, re.MULTILINE))
    names = (
        "MAC_OPT_LEN",
        "STATIC_OPT_LEN",
        "TAG_LEN",
        "NONCE_LEN",
        "MODE_MAC",
        "MODE_STATIC",
        "BIND_SADDR",
        "BIND_SPORT",
        "MAX_KEYS",
        "MAX_PORT_RULES",
        "MAX_POLICIES",
        "MAX_PROTECT",
        "MAX_STATIC",
        "MAX_EVENT_RATE",
        "KEY_STAT_OK",
        "KEY_STAT_BAD",
    )
    for name in names:
        assert int(defines[name]) == getattr(layout, name), name


def test_ipv6_walk_bound_matches_the_header():
    # A #define, so not in BTF: read it where the datapath takes it from.
    text = (ROOT / "bpf" / "parsing.h").read_text()
    (value,) = re.findall(r"^#define NT_MAX_IP6_EXT (\d+)$", text, re.MULTILINE)
    assert int(value) == layout.MAX_IP6_EXT


# max_entries of the maps whose size Python relies on (limits in
# netoken/entries.py, the halves of the policy and protect arrays).
MAP_SIZES = {
    "nt_keys": layout.MAX_KEYS,
    "nt_policies": layout.MAX_POLICIES,
    "nt_protect": layout.MAX_PROTECT,
    "nt_static": layout.MAX_STATIC,
    "nt_dst_v4": layout.LPM_MAX_ENTRIES,
    "nt_dst_v6": layout.LPM_MAX_ENTRIES,
}


def map_max_entries(obj: Path) -> dict[str, int]:
    """max_entries of every map OBJ declares, from its BTF (libbpf's
    __uint(max_entries, N) is a pointer to an array of N)."""
    by_id = btf_types(obj)["__by_id__"]
    out = {}
    for sec in by_id.values():
        if sec["kind"] != "DATASEC" or sec["name"] != ".maps":
            continue
        for v in sec["vars"]:
            var = by_id[v["type_id"]]
            for m in by_id[var["type_id"]]["members"]:
                if m["name"] == "max_entries":
                    out[var["name"]] = by_id[by_id[m["type_id"]]["type_id"]]["nr_elems"]
    return out


def test_map_sizes_match_the_objects():
    seen = set()
    for obj in production_objects():
        for name, n in map_max_entries(obj).items():
            if name in MAP_SIZES:
                assert n == MAP_SIZES[name], f"{obj.name}: {name} has {n} entries"
                seen.add(name)
    assert seen == set(MAP_SIZES)
