"""A failing site replies with a code and a fixed message: no case id, path
or exception text leaves it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from client.client_app import SITE_ERRORS, evaluate_handler, train
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
    return Message(RecordDict({"config": config}), metadata=metadata)


@pytest.mark.parametrize("handler", [train, evaluate_handler])
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
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"site-config": str(site_yaml)},
        state=RecordDict(),
        run_config={},
    )
    reply = handler(msg, context)  # type: ignore[operator]
    assert reply.has_error()
    codes = {code for code, _ in SITE_ERRORS.values()}
    assert reply.error.code in codes
    reason = reply.error.reason
    assert reason.startswith("moefl-") and "site's log" in reason
    assert str(tmp_path) not in reason and "WCH_R0001" not in reason
    assert "Traceback" not in reason and "Error(" not in reason
