"""One definition of the index rules: a JSONL line means the same caption, person and image to preprocessing
(get_face_info.py's sources) and to training (faceid.train.records), and the official drop-in names exist."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from faceid import schema
from faceid.prep.sources import iter_source_items
from faceid.train.records import read_records

LINES = [
    # MFaceTech: the caption is additional_feature; a seed-style text field beside it must not win in one
    # reader and lose in the other.
    {"file_name": "a.png", "additional_feature": "a woman, smiling", "text": "other", "id_name": "p1",
     "insightface_feature_file": "a.bin"},
    {"image_file": "b.png", "text": "a man with glasses", "identity_id": "p2", "embedding_file": "b.npy"},
    {"image": "c.png", "caption": "portrait", "additional_feature": "x", "person": 7, "identity": 9,
     "embedding": {"file": "e.npy", "row": 0}},
    {"image": "d.png", "prompt": "only a prompt", "embedding": {"file": "e.npy", "row": 1}},
]  # fmt: skip


@pytest.mark.parametrize("line", LINES)
def test_one_jsonl_line_same_caption_and_person_everywhere(tmp_path, line):
    index = tmp_path / "index.jsonl"
    index.write_text(json.dumps(line) + "\n")
    (item,) = list(iter_source_items(index))
    (records, bad) = read_records(str(index))
    assert bad == []
    (rec,) = records
    assert item.caption == rec.caption == schema.caption_of(line) != ""
    assert item.person_id == rec.person_id == schema.person_of(line)
    assert item.image == rec.image == str(tmp_path / schema.image_of(line))


def test_expected_values_of_the_rule():
    assert [schema.caption_of(x) for x in LINES] == [
        "a woman, smiling",
        "a man with glasses",
        "portrait",
        "only a prompt",
    ]
    assert [schema.person_of(x) for x in LINES] == ["p1", "p2", "7", None]


def test_official_drop_in_names():
    from ip_adapter.attention_processor import (
        AttnProcessor,
        AttnProcessor2_0,
        IPAttnProcessor,
        IPAttnProcessor2_0,
    )
    from ip_adapter.utils import is_torch2_available

    assert is_torch2_available() is True
    assert AttnProcessor2_0 is AttnProcessor and IPAttnProcessor2_0 is IPAttnProcessor
    proc = IPAttnProcessor2_0(hidden_size=64, cross_attention_dim=32, scale=0.5, num_tokens=4)
    assert proc.to_k_ip.weight.shape == (64, 32) and proc.to_v_ip.weight.shape == (64, 32)


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("faceid", "ip_adapter")


def _imports(path: Path):
    """``(line, module)`` for every absolute import in a file, function-level ones included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def _package_of(module: str, root: Path = ROOT) -> str | None:
    """The package an import lands in: ``faceid.<sub>`` for a sub-package, ``faceid`` for its top-level
    modules, ``ip_adapter``; None outside the repository's packages."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    if parts[0] == "faceid" and len(parts) > 1 and (root / "faceid" / parts[1]).is_dir():
        return f"faceid.{parts[1]}"
    return parts[0]


def package_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``{package: packages it imports}`` over faceid's sub-packages, faceid's own modules and ip_adapter."""
    graph: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for path in (root / pkg).rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            src = _package_of(".".join(rel.parts if rel.name != "__init__" else rel.parts[:-1]), root)
            for _, module in _imports(path):
                dst = _package_of(module, root)
                graph.setdefault(src, set())
                if dst and dst != src:
                    graph[src].add(dst)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted: every package cycle
    lies inside one."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    return sorted(out)


def test_cycle_finder_on_fabricated_graphs():
    """The finder the arrow test relies on: it reports a two-package loop, a longer loop, and nothing for a
    graph whose arrows all point down."""
    down = {"faceid.train": {"faceid.face", "faceid"}, "faceid.tiny": {"faceid.train", "faceid.face"},
            "faceid.face": {"faceid"}, "faceid": {"ip_adapter"}}  # fmt: skip
    assert find_cycles(down) == []
    # today's bug before issue 19: train/identity.py -> tiny.antelope while tiny/claims.py -> train
    assert find_cycles({**down, "faceid.train": {"faceid.tiny"}}) == [["faceid.tiny", "faceid.train"]]
    loop = {**down, "ip_adapter": {"faceid.face"}}  # ip_adapter -> face -> faceid -> ip_adapter
    assert find_cycles(loop) == [["faceid", "faceid.face", "ip_adapter"]]


def test_package_graph_sees_function_level_imports(tmp_path):
    (tmp_path / "faceid" / "a").mkdir(parents=True)
    (tmp_path / "faceid" / "b").mkdir()
    (tmp_path / "ip_adapter").mkdir()
    (tmp_path / "faceid" / "a" / "m.py").write_text("def f():\n    from faceid.b.n import g\n")
    (tmp_path / "faceid" / "b" / "n.py").write_text("import faceid.a.m\nimport numpy\n")
    graph = package_graph(tmp_path)
    assert graph == {"faceid.a": {"faceid.b"}, "faceid.b": {"faceid.a"}}
    assert find_cycles(graph) == [["faceid.a", "faceid.b"]]


def test_no_package_cycles():
    """Arrows between packages point one way: no cycle among faceid's sub-packages, faceid's own modules and
    ip_adapter."""
    graph = package_graph()
    assert {"faceid.train", "faceid.tiny", "faceid.face", "ip_adapter"} <= set(graph)
    assert find_cycles(graph) == []


def test_training_and_evaluation_do_not_need_the_tiny_pack():
    """faceid/tiny serves tests, download.py --tiny and benchmarks; training and evaluation code never imports it."""
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for pkg in ("train", "eval")
        for path in (ROOT / "faceid" / pkg).rglob("*.py")
        for line, module in _imports(path)
        if module == "faceid.tiny" or module.startswith("faceid.tiny.")
    ]
    assert offenders == []


def test_packages_import_no_top_level_script_and_ip_adapter_no_faceid():
    """Arrows point down: packages never import the flat scripts; ip_adapter stands alone."""
    root = ROOT
    scripts = {p.stem for p in root.glob("*.py")}
    offenders = []
    for pkg in ("faceid", "ip_adapter"):
        for path in (root / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module.split(".")[0]]
                for name in names:
                    if name in scripts or (pkg == "ip_adapter" and name == "faceid"):
                        offenders.append(f"{path.relative_to(root)}:{node.lineno} imports {name}")
    assert offenders == []
