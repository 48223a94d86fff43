"""The layout (issue #23): one capability table that the CLI, sharding, the operators and the public API are made
from and that matches ``fiftyone.yml``; an import graph that goes down the layers only, with no cycles."""

import ast
import os
import re

import pytest
import yaml

import fairbalance as fb
from fairbalance.core import capabilities, sharding
from fairbalance.ops import cli, commands, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.path.join(ROOT, "python_lib", "fairbalance")
# a subpackage may import only those of a lower rank (and itself)
RANK = {"core": 0, "datasets": 1, "find": 1, "train": 2, "tag": 3, "generate": 3, "ops": 4}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 100
# still over the limits (issue #23 item 2 splits them): this list may only shrink
KNOWN_LONG_MODULES: set[str] = set()
KNOWN_LONG_FUNCTIONS: set[str] = set()


def test_every_capability_resolves_and_is_public_under_its_names():
    for c in capabilities.TABLE:
        fn = c.load()
        assert callable(fn), c.name
        for name in (c.name, *c.aliases):
            assert name in fb.__all__ and getattr(fb, name) is fn, name
        if c.shard is not None:
            assert sharding.SHARDABLE[c.name] is c.shard and c.shard.load() is fn
            for what in ("merge", "job_view", "delete", "fields"):
                if isinstance(getattr(c.shard, what), str):
                    assert callable(c.shard.load(what)), (c.name, what)
            for target, _ in c.shard.then.values():
                module, name = target.split(":")
                assert callable(getattr(__import__(module, fromlist=[name]), name))
    assert set(sharding.SHARDABLE) == {c.name for c in capabilities.TABLE if c.shard}
    assert fb.capabilities() is capabilities.TABLE


def test_the_table_matches_fiftyone_yml_the_operators_and_the_commands():
    with open(os.path.join(ROOT, "fiftyone.yml")) as f:
        manifest = yaml.safe_load(f)
    listed = manifest["operators"]
    assert len(listed) == len(set(listed)) and set(listed) == set(capabilities.operator_names())  # App = SDK name
    assert all(name in fb.__all__ for name in capabilities.operator_names() if name not in
               capabilities.PLUMBING_OPERATORS)
    on_dataset = [c.command for c in capabilities.TABLE if c.command and c.command_kind == "dataset"]
    assert list(cli.CAPABILITIES) == on_dataset
    parser_commands = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert set(on_dataset) | {"run", "check", "export"} <= parser_commands
    assert list(pipeline.DATA_STEPS) == ["colored-digits", "colored-mnist"]
    assert pipeline.step_function("colored-digits") is fb.create_colored_digits
    assert pipeline.step_function("check") is fb.check_balance and pipeline.step_function("nope") is None


def test_an_entry_that_does_not_import_is_an_error_not_dropped(monkeypatch):
    broken = capabilities.Capability("balance_report", "fairbalance.find.no_such_module:balance_report", "1 find",
                                     "balance-report")
    monkeypatch.setitem(capabilities.BY_NAME, "balance_report", broken)
    with pytest.raises(ModuleNotFoundError, match="no_such_module"):
        commands.capability("balance-report")
    with pytest.raises(ModuleNotFoundError):
        cli.build_parser("balance-report")


def _modules():
    """module name -> (path relative to the library, parsed source)."""
    out = {}
    for folder, _, files in os.walk(LIB):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, LIB)
                mod = "fairbalance." + rel[:-3].replace(os.sep, ".")
                mod = mod[: -len(".__init__")] if mod.endswith(".__init__") else mod
                with open(path) as f:
                    out[mod] = (rel, ast.parse(f.read()))
    return out


def _imports(mod: str, tree, modules) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every fairbalance import, at any depth of the module."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.startswith("fairbalance.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("fairbalance"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((sub, None) if sub in modules else (node.module, a.name))
    return [(m, n) for m, n in out if m != "fairbalance"]  # the package itself: the public API (lazy)


def _package(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANK) else None


def test_the_import_graph_has_no_cycle_no_upward_import_and_no_private_name_across_subpackages():
    modules = _modules()
    graph = {m: set() for m in modules}
    upward, private = [], []
    for mod, (_, tree) in modules.items():
        here = _package(mod)
        for target, name in _imports(mod, tree, modules):
            assert target in modules, f"{mod} imports {target}, which does not exist"
            graph[mod].add(target)
            there = _package(target)
            if here and there and here != there and RANK[there] >= RANK[here]:
                upward.append(f"{mod} -> {target}")
            if name and name.startswith("_"):  # not even within a subpackage (lora/ adapters, finetune, generation)
                private.append(f"{mod} imports {target}.{name}")
        for node in ast.walk(tree):  # a private attribute of a module of another subpackage: mod._name
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and isinstance(node.value, ast.Name):
                bound = {a.asname or a.name: f"{n.module}.{a.name}" for n in ast.walk(tree)
                         if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("fairbalance.")
                         for a in n.names}
                target = bound.get(node.value.id)
                if target in modules and _package(target) not in (None, here):
                    private.append(f"{mod} uses {target}.{node.attr}")
    assert not upward, upward
    assert not private, sorted(set(private))
    # cycles: depth-first search over the module graph
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_modules_and_functions_are_short():
    long_modules, long_functions = set(), set()
    for rel, tree in _modules().values():
        with open(os.path.join(LIB, rel)) as f:
            if len(f.read().splitlines()) > MAX_MODULE_LINES:
                long_modules.add(rel.replace(os.sep, "/"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    long_functions.add(f"{rel.replace(os.sep, '/')}:{node.name}")
    assert long_modules <= KNOWN_LONG_MODULES, long_modules - KNOWN_LONG_MODULES
    assert long_functions <= KNOWN_LONG_FUNCTIONS, long_functions - KNOWN_LONG_FUNCTIONS


def test_old_module_paths_still_import_as_aliases():
    """Scripts written for the flat layout keep working: the old path is the same module object."""
    import fairbalance.training as old
    from fairbalance.generation import GenerationResult
    from fairbalance.train import training

    assert old is training and GenerationResult.__module__ == "fairbalance.generate.generation"
    assert fb.colored_mnist is fb.create_colored_mnist  # importing the old module path did not replace it
    import fairbalance.colored_mnist  # noqa: F401

    assert callable(fb.colored_mnist)
    assert re.match(r"fairbalance\.core\.sharding$", fb.sharding.__name__)


def test_operators_import_only_the_public_api_and_their_common_module():
    """The operators are thin adapters: ``fairbalance`` (its public names) and ``operators/_common.py`` (the one
    bridge to the library's internals), never a library module directly."""
    folder = os.path.join(ROOT, "operators")
    bad = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py") or name == "_common.py":
            continue
        with open(os.path.join(folder, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bad += [f"{name}: import {a.name}" for a in node.names if a.name.startswith("fairbalance.")]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("fairbalance"):
                if node.module != "fairbalance":
                    bad.append(f"{name}: from {node.module}")
                else:
                    bad += [f"{name}: {a.name} is not public" for a in node.names if a.name not in fb.__all__]
            elif isinstance(node, ast.ImportFrom) and node.level == 1 and node.module not in ("_common", None) \
                    and name != "__init__.py":
                bad.append(f"{name}: from .{node.module}")
    assert not bad, bad
    with open(os.path.join(folder, "_common.py")) as f:
        common = f.read()
    assert common.count('inputs.int("num_shards"') == 1  # the Shards option: one helper (shards_input) for every form
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py") and name not in ("_common.py", "sharding.py"):
            with open(os.path.join(folder, name)) as f:
                assert 'inputs.int("num_shards"' not in f.read(), name


def test_names_are_imported_from_the_module_that_defines_them():
    """``label_path`` from ``core.fields``, not through ``find.balance``: no import goes through a re-export."""
    modules = _modules()
    defined = {}
    for mod, (_, tree) in modules.items():
        names = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names |= {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}  # a, b = ...
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
        defined[mod] = names
    through = [f"{mod}: {name} from {target}" for mod, (_, tree) in modules.items()
               for target, name in _imports(mod, tree, modules) if name and name not in defined[target]]
    assert not through, through


def test_generators_take_their_data_helpers_from_core_data():
    """Images, labelled samples, sizes and seeds come from ``core.data``; ``generate`` and ``tag`` never reach into
    the classifier recipes (``train.training``) for them."""
    helpers = ("load_images", "labelled_samples", "LabelledSamples", "native_size", "seed_everything",
               "image_transform", "class_order")
    found = []
    for folder in ("generate", "tag"):
        for root, _, files in os.walk(os.path.join(LIB, folder)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(root, name)) as f:
                        text = f.read()
                    found += [f"{name}: training.{h}" for h in helpers if f"training.{h}" in text]
    assert not found, found
