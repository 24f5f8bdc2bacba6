"""Malformed input gives a clear EnpcgError: property-based tests (hypothesis) of the three input readers.

* mapping files (enpcg/mapping.py): YAML and VOTCA XML, built from valid files by random mutations (dropped
  fields, wrong types, negative/NaN/huge numbers, duplicate names, atoms out of range, empty beads, wrong
  nesting) and by random edits of their text;
* stage configs (enpcg/config.py): YAML files with known and unknown keys and values of every type;
* H5MD files (enpcg/h5md.py): valid files corrupted with h5py (missing datasets, wrong shapes and dtypes,
  NaN values, a counter larger than the data, groups and datasets swapped, bad JSON) or byte by byte.

Each reader either returns a result that honours its documented contract or raises EnpcgError; any other
exception type fails the test, as does a reader that runs longer than SLOW_S on these small inputs, and a
failed map_trajectory (the mapping `enpcg map` runs) that leaves files behind. Example budgets are fixed and
the search is derandomized (``derandomize=True``, no example database), so CI runs the same examples every
time; the module runs in about 20 s on 2 cores.
"""
import copy
import math
import signal
import time
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings, strategies as st
from hypothesis.control import currently_in_test_context

from enpcg.config import STAGES, resolve_config
from enpcg.errors import EnpcgError
from enpcg.h5md import H5MDWriter, n_frames, read_h5md
from enpcg.mapping import Mapping, load_mapping, map_trajectory

ROOT = Path(__file__).resolve().parents[1]
FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                   HealthCheck.data_too_large])
SLOW_S = 10.0  # no reader may take this long on these tiny inputs (a hang or a blow-up); margin for busy CI

# A pool of wrong values: every YAML scalar type, edge numbers, empty and nested containers.
BAD_SCALARS = [None, True, False, 0, -1, 1, 2, 3, 10**30, -(10**30), 0.5, -2.5, math.nan, math.inf, -math.inf,
               "", " ", "x", "fill", "mass", "geometry", "0", "-1", "nan", "A", "TA", "PE", "\u00e9\u00df",
               "a" * 300]
bad_values = st.recursive(st.sampled_from(BAD_SCALARS),
                          lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                  st.dictionaries(st.sampled_from(["name", "type", "atoms", "x", 1]),
                                                                  inner, max_size=3)),
                          max_leaves=6)


class Hang(BaseException):
    """Raised by the alarm in :func:`_quietly` (a BaseException, so no reader's ``except`` swallows it)."""


def _alarm(signum, frame):
    raise Hang(f"a reader ran for more than {SLOW_S} s: a hang or a blow-up on malformed input")


def _quietly(fn, *args, **kwargs):
    """Call ``fn``; return ("ok", result) or ("error", EnpcgError); anything else propagates (test fails),
    and so does a call that runs longer than SLOW_S (interrupted by SIGALRM)."""
    t0 = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, SLOW_S)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = ("ok", fn(*args, **kwargs))
    except EnpcgError as e:
        out = ("error", e)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.perf_counter() - t0 < SLOW_S, f"{fn.__name__} took {time.perf_counter() - t0:.1f} s"
    if currently_in_test_context():  # the ok/error mix shows in --hypothesis-show-statistics
        event(f"{fn.__name__}: {out[0]}")
    if out[0] == "error":
        assert str(out[1]).strip(), "an EnpcgError must say what is wrong"
    return out


# ============================================================================================ mutations
def _paths(doc, prefix=()):
    """Every path (tuple of keys/indices) into a nested dict/list document, the root included."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


def _get(doc, path):
    for k in path:
        doc = doc[k]
    return doc


@st.composite
def mutated(draw, base, n_max=3):
    """``base`` (a JSON-like document) after 1..n_max random mutations: delete, replace, duplicate, wrap in
    a list (wrong nesting), or add an unknown key."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, n_max))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["delete", "replace", "replace", "duplicate", "wrap", "add_key"]))
        if not path:  # the root
            if op in ("replace", "wrap"):
                doc = draw(bad_values) if op == "replace" else [doc]
            continue
        parent, key = _get(doc, path[:-1]), path[-1]
        if op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = draw(bad_values)
        elif op == "duplicate" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        elif op == "wrap":
            parent[key] = [parent[key]]
        elif op == "add_key" and isinstance(parent[key], dict):
            parent[key][draw(st.sampled_from(["extra", "atom", "Name", 7]))] = draw(bad_values)
    return doc


# ============================================================================================ mappings
SMALL_YAML = {
    "exclusion_bonds": 1,
    "molecules": [
        {"name": "AB", "count": 2, "n_atoms": 5, "weights": "mass",
         "beads": [{"name": "A", "type": "TA", "atoms": [0, 1]},
                   {"name": "B", "type": "TB", "atoms": [2, 3, 4], "weights": [1.0, 2.0, 1.0],
                    "orientation": {"frame": [2, 3, [4]]}}],
         "bonds": [["A", "B"]], "angles": [], "dihedrals": []},
        {"name": "PE", "count": "fill", "n_atoms": 8,
         "linear": {"atoms_per_bead": 2, "type": "C2", "name_prefix": "P"}},
    ],
}
SMALL_N = 26
SMALL_MASSES = np.array([12.0, 1.0, 16.0, 1.0, 14.0] * 2 + [14.0] * 16)


def _check_mapping(m, n_atoms):
    """The contract of a successfully read mapping: consistent sizes, weights that sum to 1, atoms in range."""
    assert isinstance(m, Mapping) and m.n_beads >= 1 and m.n_atoms == n_atoms
    assert m.topology.n_beads == m.n_beads and np.all(np.isfinite(m.topology.masses))
    for atoms, w in zip(m.bead_atoms, m.bead_weights):
        assert atoms.size and atoms.min() >= 0 and atoms.max() < n_atoms
        assert np.all(w >= 0) and abs(w.sum() - 1.0) < 1e-12
    assert len(m.hash()) == 64


def test_valid_base_documents_load(tmp_path):
    """The unmutated documents the fuzzers start from are valid (so mutations test the validation)."""
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(SMALL_YAML))
    _check_mapping(load_mapping(p, masses=SMALL_MASSES), SMALL_N)
    q = tmp_path / "m.xml"
    q.write_text(ET.tostring(_votca_tree(), encoding="unicode"))
    _check_mapping(load_mapping(q, atom_topology=_votca_atoms()), 16)


@settings(max_examples=250, **FUZZ)
@given(doc=mutated(SMALL_YAML), masses=st.sampled_from(["good", "nan", "negative", "short", "none"]))
def test_yaml_mapping_mutations_give_enpcg_error(tmp_path_factory, doc, masses):
    """A YAML mapping with dropped fields, wrong types, NaN/negative/huge numbers, duplicated beads or
    molecules, out-of-range atoms or wrong nesting (and NaN, negative, missing or miscounted masses) is read
    into a valid Mapping or refused with an EnpcgError, never another exception or a hang."""
    p = tmp_path_factory.mktemp("y") / "mapping.yaml"
    p.write_text(yaml.safe_dump(doc, allow_unicode=True))
    m = {"good": SMALL_MASSES, "nan": np.where(np.arange(SMALL_N) == 3, np.nan, SMALL_MASSES),
         "negative": -SMALL_MASSES, "short": SMALL_MASSES[:-1], "none": None}[masses]
    status, out = _quietly(load_mapping, p, masses=m)
    if status == "ok":
        _check_mapping(out, SMALL_N)
    else:
        assert str(p) in str(out)  # the message names the file


@settings(max_examples=120, **FUZZ)
@given(data=st.data())
def test_yaml_mapping_text_edits_give_enpcg_error(tmp_path_factory, data):
    """Random edits of a valid YAML mapping's text (deleted, inserted or replaced characters, truncation)
    and random text or bytes give a Mapping or an EnpcgError naming the file."""
    text = yaml.safe_dump(SMALL_YAML)
    choice = data.draw(st.sampled_from(["edit", "text", "bytes"]))
    p = tmp_path_factory.mktemp("t") / "mapping.yaml"
    if choice == "edit":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(text)))
            j = data.draw(st.integers(i, min(len(text), i + 12)))
            text = text[:i] + data.draw(st.text(alphabet=" :-[]{},\n&*!'\"#0123456789abc", max_size=6)) + text[j:]
        p.write_text(text)
    elif choice == "text":
        p.write_bytes(data.draw(st.text(max_size=200)).encode("utf-8", "replace"))
    else:
        p.write_bytes(data.draw(st.binary(max_size=200)))
    status, out = _quietly(load_mapping, p, masses=SMALL_MASSES)
    if status == "ok":
        _check_mapping(out, SMALL_N)
    else:
        assert str(p) in str(out)


def _votca_atoms():
    """Atomistic topology of the VOTCA fuzzing: two chains (residue PE) of 8 carbons C1..C8."""
    from openmm import app

    top = app.Topology()
    carbon = app.Element.getBySymbol("C")
    for _ in range(2):
        res = top.addResidue("PE", top.addChain())
        for k in range(8):
            top.addAtom(f"C{k + 1}", carbon, res)
    return top


def _votca_tree():
    xml = """<cg_molecule>
  <name>PE</name>
  <ident>PE</ident>
  <topology>
    <cg_beads>
      <cg_bead><name>B1</name><type>C4</type><mapping>A4</mapping><beads>1:PE:C1 1:PE:C2 1:PE:C3 1:PE:C4</beads></cg_bead>
      <cg_bead><name>B2</name><type>C4</type><mapping>A4</mapping><beads>1:PE:C5 1:PE:C6 1:PE:C7 1:PE:C8</beads></cg_bead>
    </cg_beads>
    <cg_bonded>
      <bond><name>b</name><beads>B1 B2</beads></bond>
    </cg_bonded>
  </topology>
  <maps>
    <map><name>A4</name><weights>15 14 14 15</weights></map>
  </maps>
</cg_molecule>"""
    return ET.fromstring(xml)


TEXTS = ["", " ", "x", "B1", "B1 B2", "B1 B1", "B1 B2 B3", "C4", "A4", "A5", "1", "-1", "0 0 0 0", "nan nan nan nan",
         "1e400 1 1 1", "1 2 3", "1:PE:C1", "1:PE:C9", "2:PE:C1", "1:XX:C1", "1:PE:C1 1:PE:C1 1:PE:C2 1:PE:C3",
         "PE", "OTHER", "2", "\u00e9"]
TAGS = ["name", "type", "mapping", "beads", "weights", "map", "maps", "cg_bead", "cg_beads", "topology",
        "cg_bonded", "bond", "angle", "dihedral", "symmetry", "ident", "d", "unknown"]


@st.composite
def votca_mutated(draw):
    root = _votca_tree()
    for _ in range(draw(st.integers(1, 3))):
        elements = list(root.iter())
        el = draw(st.sampled_from(elements))
        parents = {c: p for p in root.iter() for c in p}
        op = draw(st.sampled_from(["delete", "text", "text", "duplicate", "add", "move", "retag"]))
        if op == "delete" and el in parents:
            parents[el].remove(el)
        elif op == "text":
            el.text = draw(st.sampled_from(TEXTS))
        elif op == "duplicate" and el in parents:
            parents[el].append(copy.deepcopy(el))
        elif op == "add":
            child = ET.SubElement(el, draw(st.sampled_from(TAGS)))
            child.text = draw(st.sampled_from(TEXTS))
        elif op == "move" and el in parents:  # wrong nesting
            target = draw(st.sampled_from(elements))
            if el is not target and target not in list(el.iter()):
                parents[el].remove(el)
                target.append(el)
        elif op == "retag":
            el.tag = draw(st.sampled_from(TAGS))
    return ET.tostring(root, encoding="unicode")


def _check_votca_read(path):
    """Reading ``path`` gives a valid 16-atom Mapping or an EnpcgError naming the file."""
    status, out = _quietly(load_mapping, path, atom_topology=_votca_atoms())
    if status == "ok":
        _check_mapping(out, 16)
    else:
        assert str(path) in str(out)


@settings(max_examples=200, **FUZZ)
@given(text=votca_mutated())
def test_votca_mapping_mutations_give_enpcg_error(tmp_path_factory, text):
    """A VOTCA XML mapping with removed, duplicated, renamed or misplaced elements and wrong texts (unknown
    beads and maps, atoms the topology lacks, non-numeric, NaN or infinite weights, duplicate bead names) is
    read into a valid Mapping or refused with an EnpcgError naming the file."""
    p = tmp_path_factory.mktemp("v") / "mapping.xml"
    p.write_text(text)
    _check_votca_read(p)


@settings(max_examples=80, **FUZZ)
@given(data=st.data())
def test_votca_text_edits_give_enpcg_error(tmp_path_factory, data):
    """Random character edits and truncations of a valid VOTCA file (broken XML, entities, stray text) give
    a Mapping or an EnpcgError naming the file."""
    text = ET.tostring(_votca_tree(), encoding="unicode")
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 20)))
        text = text[:i] + data.draw(st.text(alphabet="<>/&;!-= \"'abcPE:0123456789\n", max_size=8)) + text[j:]
    p = tmp_path_factory.mktemp("vt") / "mapping.xml"
    p.write_text(text)
    _check_votca_read(p)


def _alias_bomb(key):
    """YAML whose value of ``key`` is 9 nested levels of 9 aliases: 9**9 leaves if expanded (a repr of it)."""
    levels = ["&a [x, x, x, x, x, x, x, x, x]"]
    for k in "bcdefghi":
        prev = chr(ord(k) - 1)
        levels.append(f"&{k} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return f"{key}: [{', '.join(levels)}]\n"


def test_pathological_yaml_and_xml_are_refused_quickly(tmp_path):
    """A YAML alias bomb (as a mapping field and as a config value), a 10,000-deep nested YAML list, an XML
    entity bomb, a directory and a file of undecodable bytes are each refused with an EnpcgError within
    seconds (no exponential repr in the message, no RecursionError or UnicodeDecodeError)."""
    bomb = _alias_bomb("exclusion_bonds") + "molecules: []\n"
    cases = {"bomb.yaml": bomb, "deep.yaml": "molecules: " + "[" * 10000 + "]" * 10000 + "\n",
             "bytes.yaml": b"\xff\xfe\x00molecules", "bomb.xml": (
                 '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                 + "".join(f'<!ENTITY lol{k} "{("&lol%s;" % (k - 1 if k > 1 else "")) * 10}">' for k in range(1, 9))
                 + "]><cg_molecule><name>&lol8;</name></cg_molecule>")}
    for name, text in cases.items():
        p = tmp_path / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        status, err = _quietly(load_mapping, p, masses=SMALL_MASSES)
        assert status == "error" and str(p) in str(err), name
    status, err = _quietly(load_mapping, tmp_path, masses=SMALL_MASSES)
    assert status == "error" and str(tmp_path) in str(err)
    (tmp_path / "bomb_config.yaml").write_text(_alias_bomb("out"))
    status, err = _quietly(resolve_config, "sample", tmp_path / "bomb_config.yaml")
    assert status == "error" and "sample.out" in str(err) and len(str(err)) < 1000
    status, err = _quietly(resolve_config, "sample", tmp_path)
    assert status == "error" and str(tmp_path) in str(err)


# ============================================================================================ configs
def _config_values():
    return st.one_of(bad_values, st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=10), st.booleans())


@settings(max_examples=300, **FUZZ)
@given(stage=st.sampled_from(sorted(STAGES)), data=st.data())
def test_stage_config_files_give_values_of_the_declared_type_or_enpcg_error(tmp_path_factory, stage, data):
    """A stage config YAML with known keys, unknown keys (also non-string ones), sections and values of any
    type (None, lists, dicts, NaN, infinities, huge integers, bools for numbers, floats for integers) either
    resolves to a config whose every value has the option's declared type (finite floats, whole-number ints,
    choices respected) or is refused with an EnpcgError naming the file."""
    keys = sorted(STAGES[stage])
    doc = data.draw(st.dictionaries(st.one_of(st.sampled_from(keys), st.sampled_from(["bogus", 3, None, "n-frames"])),
                                    _config_values(), max_size=5))
    if data.draw(st.booleans()):
        doc = {stage: doc} if data.draw(st.booleans()) else {stage: doc, data.draw(st.sampled_from(sorted(STAGES))): {}}
    p = tmp_path_factory.mktemp("c") / "config.yaml"
    p.write_text(yaml.safe_dump(doc, allow_unicode=True))
    status, out = _quietly(resolve_config, stage, p)
    if status == "error":
        assert str(p) in str(out)
        return
    for key, spec in STAGES[stage].items():
        v = out[key]
        assert type(v) is spec["type"], (key, v)
        if spec["type"] is float:
            assert math.isfinite(v), (key, v)
        if spec["choices"]:
            assert v in spec["choices"]


@settings(max_examples=60, **FUZZ)
@given(raw=st.one_of(st.binary(max_size=120), st.text(max_size=120).map(lambda s: s.encode("utf-8", "replace"))))
def test_stage_config_random_bytes_give_enpcg_error(tmp_path_factory, raw):
    """Random bytes or text as a config file give a config or an EnpcgError naming the file."""
    p = tmp_path_factory.mktemp("cb") / "config.yaml"
    p.write_bytes(raw)
    status, out = _quietly(resolve_config, "fit", p)
    if status == "error":
        assert str(p) in str(out)


def test_config_type_errors_are_named():
    """Silent coercions are refused: a float for an integer option, a bool for a number, a list for a path,
    NaN for a temperature, and an empty value; the message names the option and the fix."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for text, field in [("n_frames: 12.5\n", "n_frames"), ("n_frames: true\n", "n_frames"),
                            ("temperature: .nan\n", "temperature"), ("temperature: false\n", "temperature"),
                            ("out: [a, b]\n", "out"), ("out:\n", "out"), ("seed: 2.0e+40\n", "seed")]:
            p = Path(d) / "c.yaml"
            p.write_text(text)
            with pytest.raises(EnpcgError, match=f"sample.{field}.*Fix"):
                resolve_config("sample", p)
        p = Path(d) / "ok.yaml"
        p.write_text("n_frames: 12.0\ntemperature: 300\nout: 2024\n")  # whole floats and numeric names are fine
        cfg = resolve_config("sample", p)
        assert cfg["n_frames"] == 12 and cfg["temperature"] == 300.0 and cfg["out"] == "2024"


# ============================================================================================ H5MD
H5_N, H5_F = 5, 4


def _write_h5md(path, seed=0):
    rng = np.random.default_rng(seed)
    with H5MDWriter(path, H5_N, masses=np.arange(1.0, H5_N + 1), species=[f"C{i}" for i in range(H5_N)],
                    topology_json='{"a": 1}', metadata={"temperature_K": 450.0}) as w:
        for i in range(H5_F):
            w.append(rng.normal(size=(H5_N, 3)), rng.normal(size=(H5_N, 3)), np.diag([3.0, 3.1, 3.2]), 0.1 * i,
                     10 * i, potential_energy=-float(i))
    return path


DATASETS = ["particles/all/position/value", "particles/all/position/step", "particles/all/position/time",
            "particles/all/force/value", "particles/all/force/step", "particles/all/box/edges/value",
            "observables/potential_energy/value", "parameters/enpcg/masses", "parameters/enpcg/species",
            "parameters/enpcg/topology_json", "parameters/enpcg/metadata"]
GROUPS = ["h5md", "particles", "particles/all", "particles/all/position", "particles/all/force",
          "particles/all/box", "particles/all/box/edges", "observables", "parameters", "parameters/enpcg"]
SHAPES = [(), (0,), (1,), (H5_F,), (H5_F + 3,), (H5_F, H5_N), (H5_F, H5_N, 3), (H5_F, H5_N + 1, 3),
          (H5_F, H5_N, 2), (H5_F - 2, H5_N, 3), (H5_F, 3, 3), (H5_F, 3), (2, 2, 2, 2), (H5_N,), (H5_N - 1,)]
DTYPES = ["f8", "f4", "i8", "u1", "?", "c16", "S4", "str", "compound"]
COUNTERS = [-1, 0, 2, H5_F, H5_F + 1, 10**12, 2.5, "3", "x", b"4", [1, 2], True]
UNITS = ["nm", "Angstrom", "furlong", b"nm", 3, "", "kJ mol-1 nm-1", "ps", "fs"]
JSONS = ["{", "[1, 2]", "null", "3", '{"a": 1}', "\u00e9", "", '"text"']


def _make_dataset(g, name, shape, dtype, fill):
    if dtype == "str":
        data = np.full(shape, "x", dtype=object) if shape else "x"
        return g.create_dataset(name, data=data, dtype=h5py.string_dtype())
    if dtype == "compound":
        dt = np.dtype([("a", "f8"), ("b", "i4")])
        return g.create_dataset(name, data=np.zeros(shape, dtype=dt))
    if dtype == "S4":
        return g.create_dataset(name, data=np.full(shape, b"1.0", dtype="S4"))
    with np.errstate(invalid="ignore", over="ignore"):  # NaN or 1e308 cast to integers: garbage wanted
        data = np.full(shape, fill).astype(dtype)
    return g.create_dataset(name, data=data)


@st.composite
def h5md_corruption(draw):
    """A list of corruption steps (applied with h5py) to a valid file."""
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["delete", "reshape", "reshape", "nan", "counter", "counter", "swap", "unit",
                                   "json", "attr_junk"]))
        if op == "delete":
            steps.append(("delete", draw(st.sampled_from(DATASETS + GROUPS))))
        elif op == "reshape":
            steps.append(("reshape", draw(st.sampled_from(DATASETS)), draw(st.sampled_from(SHAPES)),
                          draw(st.sampled_from(DTYPES)), draw(st.sampled_from([0.0, 1.0, math.nan, math.inf, 1e308]))))
        elif op == "nan":
            steps.append(("nan", draw(st.sampled_from(DATASETS[:7])), draw(st.integers(0, H5_F - 1)),
                          draw(st.sampled_from([math.nan, math.inf, -math.inf]))))
        elif op == "counter":
            steps.append(("counter", draw(st.sampled_from(COUNTERS))))
        elif op == "swap":  # a dataset where a group belongs, or a group where a dataset belongs
            steps.append(("swap", draw(st.sampled_from(DATASETS + GROUPS))))
        elif op == "unit":
            steps.append(("unit", draw(st.sampled_from(DATASETS[:7])), draw(st.sampled_from(UNITS))))
        elif op == "json":
            steps.append(("json", draw(st.sampled_from(["parameters/enpcg/metadata", "parameters/enpcg/topology_json"])),
                          draw(st.sampled_from(JSONS))))
        else:
            steps.append(("attr_junk", draw(st.sampled_from(["h5md", "particles/all/box", "parameters/enpcg"]))))
    return steps


def _corrupt(path, steps):
    with h5py.File(path, "r+") as f:
        for step in steps:
            op, key = step[0], (step[1] if len(step) > 1 else None)
            if op == "counter":
                if "parameters/enpcg" in f:
                    f["parameters/enpcg"].attrs["n_frames"] = key
                continue
            if op == "attr_junk":
                if key in f:
                    f[key].attrs["dimension"] = "junk"
                    f[key].attrs["boundary"] = [1, 2]
                continue
            parent = key.rsplit("/", 1)[0] if "/" in key else None
            name = key.rsplit("/", 1)[-1]
            if parent is not None and (parent not in f or not isinstance(f[parent], h5py.Group)):
                continue
            g = f[parent] if parent else f
            if op == "delete":
                if name in g:
                    del g[name]
            elif op == "reshape":
                if name in g:
                    del g[name]
                _make_dataset(g, name, step[2], step[3], step[4])
            elif op == "nan":
                if name in g and isinstance(g[name], h5py.Dataset) and g[name].dtype.kind == "f" and g[name].ndim:
                    data = g[name][()]
                    data.reshape(data.shape[0], -1)[min(step[2], data.shape[0] - 1), 0] = step[3]
                    g[name][...] = data
            elif op == "swap":
                if name in g:
                    was_group = isinstance(g[name], h5py.Group)
                    del g[name]
                    if was_group:
                        g.create_dataset(name, data=np.zeros(3))
                    else:
                        g.create_group(name).create_dataset("value", data=np.zeros(3))
            elif op == "unit":
                if name in g:
                    g[name].attrs["unit"] = step[2]
            elif op == "json":
                if name in g:
                    del g[name]
                g.create_dataset(name, data=step[2], dtype=h5py.string_dtype())


def _check_frames(fr, require_forces):
    """The reader's contract: consistent shapes, finite positions and forces, float64 arrays."""
    F, n = fr.positions.shape[:2]
    assert fr.positions.shape == (F, n, 3) and fr.positions.dtype == np.float64
    assert np.all(np.isfinite(fr.positions))
    if require_forces:
        assert fr.forces is not None
    if fr.forces is not None:
        assert fr.forces.shape == (F, n, 3) and np.all(np.isfinite(fr.forces))
    assert fr.box is None or fr.box.shape == (F, 3, 3)
    assert fr.time.shape == (F,) and fr.step.shape == (F,) and fr.step.dtype == np.int64
    assert fr.potential_energy is None or fr.potential_energy.shape == (F,)
    assert fr.masses is None or fr.masses.shape == (n,)
    assert fr.species is None or len(fr.species) == n
    assert isinstance(fr.metadata, dict)
    assert fr.topology_json is None or isinstance(fr.topology_json, str)


@settings(max_examples=250, **FUZZ)
@given(steps=h5md_corruption(), require_forces=st.booleans(),
       frames=st.sampled_from([None, [0], [-1, 0], slice(1, 3), 0]))
def test_corrupted_h5md_gives_enpcg_error(tmp_path_factory, steps, require_forces, frames):
    """An H5MD file with missing datasets or groups, wrong shapes or dtypes (strings, compounds, complex,
    bools), NaN or infinite values, a frame counter larger than the data (or negative, fractional, text),
    groups and datasets swapped, unknown units or broken JSON parameters is read into Frames that honour the
    reader's contract, or refused with an EnpcgError naming the file; n_frames() behaves the same."""
    p = _write_h5md(tmp_path_factory.mktemp("h") / "t.h5")
    _corrupt(p, steps)
    status, out = _quietly(read_h5md, p, frames=frames, require_forces=require_forces)
    if status == "ok":
        _check_frames(out, require_forces)
    else:
        assert str(p) in str(out)
    status, out = _quietly(n_frames, p)
    if status == "ok":
        assert isinstance(out, int) and out >= 0
    else:
        assert str(p) in str(out)


@settings(max_examples=80, **FUZZ)
@given(data=st.data())
def test_truncated_or_byte_corrupted_h5md_gives_enpcg_error(tmp_path_factory, data):
    """A valid H5MD file truncated anywhere, with random byte ranges overwritten, or replaced by random
    bytes, is read (when the damage missed the data) or refused with an EnpcgError naming the file."""
    p = _write_h5md(tmp_path_factory.mktemp("b") / "t.h5")
    raw = bytearray(p.read_bytes())
    op = data.draw(st.sampled_from(["truncate", "overwrite", "overwrite", "random"]))
    if op == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif op == "overwrite":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            chunk = data.draw(st.binary(min_size=1, max_size=64))
            raw[i:i + len(chunk)] = chunk
    else:
        raw = bytearray(data.draw(st.binary(max_size=2048)))
    p.write_bytes(bytes(raw))
    status, out = _quietly(read_h5md, p, require_forces=False)
    if status == "ok":
        _check_frames(out, False)
    else:
        assert str(p) in str(out)


@settings(max_examples=40, **FUZZ)
@given(steps=h5md_corruption())
def test_enpcg_map_of_a_corrupted_trajectory_leaves_no_files(tmp_path_factory, steps):
    """Mapping a corrupted atomistic H5MD file either succeeds or raises EnpcgError and leaves no output
    file (not even a temporary one) in the output folder."""
    d = tmp_path_factory.mktemp("m")
    p = _write_h5md(d / "aa.h5")
    _corrupt(p, steps)
    text = "molecules:\n  - {name: M, n_atoms: 5, beads: [{name: A, type: T, atoms: [0, 1, 2, 3, 4]}]}\n"
    (d / "mapping.yaml").write_text(text)
    out = d / "cg"
    out.mkdir()

    def run():
        mapping = load_mapping(d / "mapping.yaml", masses=np.arange(1.0, H5_N + 1))
        return map_trajectory(mapping, p, out / "cg.h5", progress=False)

    status, _ = _quietly(run)
    if status == "error":
        assert list(out.iterdir()) == []
    else:
        assert sorted(x.name for x in out.iterdir()) == ["cg.h5", "cg.pdb", "cg_topology.json"]
