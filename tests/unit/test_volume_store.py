"""The site's store of preprocessed volumes: reused, invalidated when the plan
or the data change, rebuilt when corrupt, filled by `moefl check --prepare`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from client.data.dataset import SiteDataset
from client.data.site_config import load_site_config
from client.data.site_data import list_cases
from shared_model.plan import Plan


def _dataset(site_yaml: Path, plan: Plan, store: Path) -> SiteDataset:
    config = load_site_config(site_yaml)
    cases = list_cases(config.dataset_dir, require_outcome=True)[:3]
    return SiteDataset(
        cases, plan, adc_scale=config.adc_scale, train=False, store=store
    )


def _refuse(*_: Any) -> Any:
    raise AssertionError("preprocessed again instead of reading the store")


def test_the_store_is_reused_across_processes(tiny_copy: Path, tmp_path: Path) -> None:
    site = tiny_copy / "site_configs" / "sysucc.yaml"
    plan = Plan.load(tiny_copy / "plan.json")
    first = _dataset(site, plan, tmp_path / "store")
    volumes = [first._volume(i) for i in range(3)]
    stored = sorted((tmp_path / "store").rglob("*.safetensors"))
    assert len(stored) == 3
    again = _dataset(site, plan, tmp_path / "store")  # a new process's dataset
    again.preprocess = _refuse  # type: ignore[assignment]
    for i, v in enumerate(volumes):
        w = again._volume(i)
        assert set(w) == set(v) == {"t2", "adc", "label"}
        assert all(torch.equal(v[k], w[k]) for k in v)
    # what a training sample is made of does not depend on the store
    plain = SiteDataset(first.cases, plan, adc_scale=first.adc_scale, train=False)
    assert torch.equal(plain[0]["image"], again[0]["image"])


def test_a_new_plan_or_changed_data_is_preprocessed_again(
    tiny_copy: Path, tmp_path: Path
) -> None:
    site = tiny_copy / "site_configs" / "sysucc.yaml"
    plan = Plan.load(tiny_copy / "plan.json")
    first = _dataset(site, plan, tmp_path / "store")
    first._volume(0)
    other = Plan(patch_size=plan.patch_size, spacing=(3.0, 3.0, 3.0))
    assert _dataset(site, other, tmp_path / "store").store.load(first.cases[0]) is None  # type: ignore[union-attr]
    case = first.cases[0]
    st = os.stat(case.adc)
    os.utime(case.adc, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    again = _dataset(site, plan, tmp_path / "store")
    assert again.store is not None and again.store.load(case) is None  # stale
    calls = []
    real = again.preprocess
    again.preprocess = lambda item: calls.append(item) or real(item)  # type: ignore[assignment,func-returns-value]
    again._volume(0)
    assert len(calls) == 1 and again.store.load(case) is not None  # replaced


def test_a_corrupt_file_is_rebuilt_not_used(
    tiny_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = tiny_copy / "site_configs" / "sysucc.yaml"
    plan = Plan.load(tiny_copy / "plan.json")
    first = _dataset(site, plan, tmp_path / "store")
    v = first._volume(0)
    path = first.store.path(first.cases[0])  # type: ignore[union-attr]
    path.write_bytes(path.read_bytes()[:50])
    again = _dataset(site, plan, tmp_path / "store")
    with caplog.at_level(logging.WARNING):
        w = again._volume(0)
    assert "unreadable" in caplog.text and str(path) in caplog.text
    assert all(torch.equal(v[k], w[k]) for k in v)
    assert again.store is not None and again.store.load(again.cases[0]) is not None


def test_check_prepare_fills_the_store_once(tiny_copy: Path) -> None:
    site = tiny_copy / "site_configs" / "sysucc.yaml"
    runner = CliRunner()
    first = runner.invoke(app, ["check", str(site), "--prepare"])
    assert first.exit_code == 0, first.output
    config = load_site_config(site)
    n = len(list_cases(config.dataset_dir, require_outcome=True))
    assert f"prepared {n} cases (0 already stored)" in first.output
    assert len(list((config.run_dir / "preprocessed").rglob("*.safetensors"))) == n
    second = runner.invoke(app, ["check", str(site), "--prepare"])
    assert f"prepared 0 cases ({n} already stored)" in second.output


def test_a_frozen_backbones_masks_are_reused_by_the_next_process(
    tiny_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from client.scoring import inference as scoring
    from shared_model.model import build_model
    from shared_model.model_config import ModelConfig

    site = tiny_copy / "site_configs" / "sysucc.yaml"
    plan = Plan.load(tiny_copy / "plan.json")
    dataset = _dataset(site, plan, tmp_path / "store").whole_view()
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_plan(plan, base_filters=4, max_filters=16))
    cpu = torch.device("cpu")
    scoring._SEGMENTED.clear()
    first = scoring.score_dataset(model, dataset, plan, device=cpu)
    masks = sorted((tmp_path / "store").rglob("segmented/*/*.safetensors"))
    assert len(masks) == 3
    scoring._SEGMENTED.clear()  # a new process: nothing in memory
    monkeypatch.setattr(scoring, "segment", _refuse)
    again = scoring.score_dataset(model, dataset, plan, device=cpu)
    for a, b in zip(first, again, strict=True):
        assert a.probs == b.probs and a.dice == b.dice
        assert (a.mask == b.mask).all() and a.volume_ml == b.volume_ml
    # another backbone segments again, and replaces the old masks
    monkeypatch.undo()
    with torch.no_grad():
        next(model.parameters()).add_(0.1)
    scoring._SEGMENTED.clear()
    scoring.score_dataset(model, dataset, plan, device=cpu)
    folders = list((masks[0].parents[1]).iterdir())
    assert len(folders) == 1 and folders[0] != masks[0].parent
    # a corrupt mask file is redone
    victim = next(folders[0].glob("*.safetensors"))
    victim.write_bytes(b"broken")
    scoring._SEGMENTED.clear()
    scoring.score_dataset(model, dataset, plan, device=cpu)
    assert victim.stat().st_size > 100
