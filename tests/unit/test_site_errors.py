"""A failing site replies with a code and a fixed message: no case id, path
or exception text leaves it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client.node.client_app import SITE_ERRORS, evaluate, train
from shared_model.federation_config import FederationConfig
from shared_model.plan import PRESET_PLANS


def _instruction(kind: str, run_config: dict) -> Message:
    plan = PRESET_PLANS["tiny"]
    config = ConfigRecord(
        {
            "run-config": json.dumps(run_config),
            "plan": json.dumps(plan.to_dict()),
            "model-config": "{}",
            "server-round": 1,
        }
    )
    metadata = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=kind,
    )
    return Message(
        RecordDict({"config": config, "arrays": ArrayRecord()}), metadata=metadata
    )


def _context(site_yaml: Path) -> Context:
    """The node context of a deployed site whose YAML is ``site_yaml``."""
    return Context(
        run_id=1,
        node_id=7,
        node_config={"site-config": str(site_yaml)},
        state=RecordDict(),
        run_config={},
    )


@pytest.mark.parametrize("handler", [train, evaluate])
def test_a_failing_site_sends_a_code_not_its_paths(
    handler: object, tmp_path: Path
) -> None:
    secret = tmp_path / "WCH_R0001_patient_folder"
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(
        "site_name: west_china\nrole: train\n"
        f"dataset_dir: {secret}\nadc_unit: '1e-3'\nrun_dir: {tmp_path / 'run'}\n"
    )
    run_config = FederationConfig().to_run_config()
    msg = _instruction("train" if handler is train else "evaluate", run_config)
    context = _context(site_yaml)
    reply = handler(msg, context)  # type: ignore[operator]
    assert reply.has_error()
    codes = {code for code, _ in SITE_ERRORS.values()}
    assert reply.error.code in codes
    reason = reply.error.reason
    assert reason.startswith("moefl-") and "site's log" in reason
    assert str(tmp_path) not in reason and "WCH_R0001" not in reason
    assert "Traceback" not in reason and "Error(" not in reason


def test_a_dp_site_refuses_staged_training_before_spending(
    tiny_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Head training over cached features is not private: a site with a
    `privacy` section answers a staged federation with the config code and
    spends nothing from its budget."""
    site_yaml = tiny_copy / "site_configs" / "sysucc.yaml"
    site_yaml.write_text(
        site_yaml.read_text()
        + "privacy:\n  target_epsilon: 8.0\n  delta: 1.0e-3\n  max_grad_norm: 1.0\n"
    )
    from shared_model.model import build_model
    from shared_model.model_config import ModelConfig
    from wire.records import arrays_to_record

    msg = _instruction("train", FederationConfig().to_run_config())
    cfg = ModelConfig.from_plan(PRESET_PLANS["tiny"], base_filters=4, max_filters=16)
    msg.content.config_records["config"]["model-config"] = json.dumps(cfg.to_dict())
    weights = {k: v.numpy() for k, v in build_model(cfg).state_dict().items()}
    msg.content.array_records["arrays"] = arrays_to_record(weights)
    context = _context(site_yaml)
    reply = train(msg, context)
    assert reply.has_error() and reply.error.code == SITE_ERRORS["config"][0]
    assert 'training = "joint"' in caplog.text  # the reason, in the site's log
    assert not list((tiny_copy / "runs" / "sysucc").glob("privacy*"))

    # a declared backbone that is not the one sent
    from shared_model.backbone import backbone_digest

    fed = FederationConfig(backbone="public.safetensors").to_run_config()
    config = msg.content.config_records["config"]
    config["run-config"] = json.dumps(fed)
    config["backbone-sha256"] = "0" * 64
    caplog.clear()
    reply = train(msg, context)
    assert reply.has_error() and reply.error.code == SITE_ERRORS["config"][0]
    assert "is not the one the federation declares" in caplog.text
    # the declared one, but the site pins others
    config["backbone-sha256"] = backbone_digest(weights)
    site_yaml.write_text(
        site_yaml.read_text() + f"  public_backbones: ['{'1' * 64}']\n"
    )
    from client.node import site_state

    site_state._SITES.clear()
    caplog.clear()
    reply = train(msg, context)
    assert reply.has_error() and "not in `privacy.public_backbones`" in caplog.text
    assert not list((tiny_copy / "runs" / "sysucc").glob("privacy*"))
