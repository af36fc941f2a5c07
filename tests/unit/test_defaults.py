"""Each default is written once: the advice rule's in shared_model/policy.py,
the heads' and the network widths' in shared_model/federation_config.py. A
literal default for one of those names anywhere else (a parameter default, a
dataclass field, a module constant) is a copy that would drift; this test
finds it. The copy pyproject.toml must keep (Flower reads it, it cannot import)
is checked against FederationConfig in tests/unit/test_strategy.py."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("client", "server", "shared_model", "multisite", "simulations", "cli")

RULE_OWNER = "shared_model/policy.py"
CONFIG_OWNER = "shared_model/federation_config.py"
OWNED = {
    # the advice rule
    "margin": RULE_OWNER,
    "recommendation_margin": RULE_OWNER,
    "DEFAULT_MARGIN": RULE_OWNER,
    "min_support": RULE_OWNER,
    "min_expert_support": RULE_OWNER,
    "DEFAULT_MIN_SUPPORT": RULE_OWNER,
    "guideline_regimen": RULE_OWNER,
    "GUIDELINE": RULE_OWNER,
    "q": RULE_OWNER,
    "gain_threshold": RULE_OWNER,
    # the heads and the network's widths
    "head_epochs": CONFIG_OWNER,
    "head_lr": CONFIG_OWNER,
    "head_batch_size": CONFIG_OWNER,
    "base_filters": CONFIG_OWNER,
    "max_filters": CONFIG_OWNER,
    "embed_dim": CONFIG_OWNER,
}
HEAD_FIELDS = {"epochs", "lr", "batch_size"}
"""HeadConfig's fields: generic names, watched inside HeadConfig only."""
FREE = {
    (CONFIG_OWNER, "gain_threshold"),  # `choose`: the run config's, not the rule's q
    ("cli/site.py", "head_epochs"),  # local training fits its heads in one go (200)
}
"""Literal defaults of a watched name that are deliberately another value."""


def _literal(node: ast.expr | None) -> bool:
    """A number or text written out (``0.05``, ``-1``, ``"TNT"``)."""
    if isinstance(node, ast.UnaryOp):
        node = node.operand
    return (
        isinstance(node, ast.Constant)
        and isinstance(node.value, (int, float, str))
        and not isinstance(node.value, bool)
    )


def _defaults(tree: ast.Module) -> Iterator[tuple[str, str, ast.expr | None]]:
    """``(scope, name, value)`` of every default a module writes: parameter
    defaults, class fields, module constants (scope: the class, else '')."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            positional = [*a.posonlyargs, *a.args]
            for arg, default in zip(
                positional[len(positional) - len(a.defaults) :], a.defaults, strict=True
            ):
                yield "", arg.arg, default
            for arg, kw_default in zip(a.kwonlyargs, a.kw_defaults, strict=True):
                yield "", arg.arg, kw_default
    bodies: list[tuple[str, list[ast.stmt]]] = [("", tree.body)]
    bodies += [(n.name, n.body) for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    for scope, body in bodies:
        for stmt in body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                yield scope, stmt.target.id, stmt.value
            elif isinstance(stmt, ast.Assign):
                for target in stmt.targets:
                    if isinstance(target, ast.Name):
                        yield scope, target.id, stmt.value


def literal_copies(source: str, where: str) -> list[str]:
    """The literal defaults in ``source`` (a file at ``where``) of names owned
    elsewhere."""
    out = []
    for scope, name, value in _defaults(ast.parse(source)):
        if not _literal(value) or (where, name) in FREE:
            continue
        owner = OWNED.get(name)
        if scope == "HeadConfig" and name in HEAD_FIELDS:
            owner = CONFIG_OWNER
        if owner is not None and owner != where:
            line = getattr(value, "lineno", "?")
            out.append(f"{where}:{line}: `{name}` = {ast.unparse(value)}")  # type: ignore[arg-type]
    return out


def test_no_rule_head_or_width_default_is_copied() -> None:
    found = [
        copy
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for copy in literal_copies(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert not found, "import the default from its owner instead:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "copy",
    [
        "def board(world, margin: float = 0.05): ...",
        "def guard(support, *, min_support=30): ...",
        "class Rule:\n    margin: float = 0.05",
        "class HeadConfig:\n    epochs: int = 10",
        "class ModelConfig:\n    base_filters: int = 8",
        "DEFAULT_MARGIN = 0.05",
        "GUIDELINE = 'TNT'",
        "f = lambda q=0.9: q",
    ],
)
def test_the_scan_finds_a_copy(copy: str) -> None:
    assert literal_copies(copy, "simulations/scoreboard.py")


def test_the_scan_leaves_imports_and_other_names_alone() -> None:
    source = (
        "from shared_model.policy import DEFAULT_MARGIN\n"
        "def board(world, margin: float = DEFAULT_MARGIN, lr: float = 0.001): ...\n"
        "class TrainConfig:\n    epochs: int = 1\n"
    )
    assert literal_copies(source, "simulations/scoreboard.py") == []


def test_the_derived_defaults_are_the_owners() -> None:
    from client.training.heads import HeadConfig
    from shared_model.federation_config import FederationConfig
    from shared_model.model_config import ModelConfig
    from shared_model.plan import Plan
    from shared_model.policy import (
        DEFAULT_MARGIN,
        DEFAULT_MIN_SUPPORT,
        GUIDELINE,
        RecommendationRule,
    )

    fed, head, model, rule = (
        FederationConfig(),
        HeadConfig(),
        ModelConfig(),
        RecommendationRule(),
    )
    assert (head.epochs, head.lr, head.batch_size) == (
        fed.head_epochs,
        fed.head_lr,
        fed.head_batch_size,
    )
    assert (model.base_filters, model.max_filters, model.embed_dim) == (
        fed.base_filters,
        fed.max_filters,
        fed.embed_dim,
    )
    assert (model.patch_size, model.spacing) == (Plan().patch_size, Plan().spacing)
    assert fed.recommendation_margin == rule.margin == DEFAULT_MARGIN
    assert fed.min_expert_support == DEFAULT_MIN_SUPPORT
    assert fed.guideline_regimen == rule.reference == GUIDELINE


NAMES = {
    "plan.json": "shared_model/plan.py",
    "metrics.json": "server/run_folder.py",
    "evaluation.json": "shared_model/site_evaluation.py",
    "training.json": "multisite/training.py",
    "site_configs": "shared_model/layout.py",
    "oracle": "shared_model/layout.py",
    "cohort.json": "shared_model/layout.py",
    "potential_outcomes.csv": "shared_model/layout.py",
    "preprocessed": "shared_model/layout.py",
    "feature_cache": "shared_model/layout.py",
}
"""Each artifact's and each folder's name, and the one module that spells it
(``sites``, ``prospective`` and ``test`` name other things too: not scanned)."""
NOT_OURS = {("simulations/benchmarks/nnunet_reference.py", "preprocessed")}
"""nnU-Net's own folder of that name."""


def _path_parts(tree: ast.Module) -> Iterator[ast.Constant]:
    """Text joined into a path: ``folder / "name"`` (either side)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and isinstance(side.value, str):
                    yield side


def spelled_names(source: str, where: str) -> list[str]:
    """The artifact and folder names ``source`` spells itself: as a path part,
    or any text that is exactly one of the file names."""
    tree = ast.parse(source)
    found = {id(c): c for c in _path_parts(tree)}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and "." in node.value
            and node.value in NAMES
        ):
            found[id(node)] = node
    return [
        f"{where}:{c.lineno}: {c.value!r}"
        for c in found.values()
        if NAMES.get(c.value, where) != where and (where, c.value) not in NOT_OURS
    ]


def test_artifact_and_folder_names_are_spelt_by_their_owner() -> None:
    found = [
        hit
        for package in (*PACKAGES, "wire")
        for path in sorted((ROOT / package).rglob("*.py"))
        for hit in spelled_names(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert not found, "import the name from its owner instead:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "copy",
    [
        'plan = cohort / "plan.json"',
        'record = json.loads((run / "metrics.json").read_text())',
        'cache = config.run_dir / "feature_cache"',
        'yamls = sorted((cohort / "test" / "site_configs").glob("*.yaml"))',
        'NAMES = ("oracle", "cohort.json")',
    ],
)
def test_the_name_scan_finds_a_copy(copy: str) -> None:
    assert spelled_names(copy, "simulations/demo.py")
