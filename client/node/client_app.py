"""Flower ClientApp: a hospital's node, a thin adapter over
:mod:`client.node.site_round`.

Each handler reads the coordinator's request and the global weights
(:func:`wire.records.read_request`), calls the plain function
(:func:`client.node.site_round.train_round`,
:func:`client.node.site_round.evaluate_round`, for the planning query
:func:`client.node.site_round.fingerprint_round`, and for the Newton fit of the
linear head :func:`client.node.posterior_round.newton_round`) with the node config (``site-config``:
the site YAML; in simulation ``partition-id``), and packs its result
(:mod:`wire.records`).

Failures: an exception in either handler is logged in full at the site and
answered with an error reply that carries only a code and a fixed message
(:data:`SITE_ERRORS`): our messages name case ids and paths, which stay at the
site.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from client.node.posterior_round import newton_round
from client.node.secure_round import (
    keys_round,
    masked_round,
    shares_round,
    unmask_round,
)
from client.node.site_round import evaluate_round, fingerprint_round, train_round
from secagg.records import (
    SECAGG,
    KeysQuery,
    MaskedQuery,
    SharesQuery,
    UnmaskQuery,
    shares_reply,
    unmask_reply,
)
from shared_model.errors import (
    ConfigError,
    DataError,
    MoeflError,
    PlanRefused,
    SecureAggregationRequired,
)
from shared_model.messages import INFO, SITE
from wire.records import (
    evaluation_content,
    fingerprint_content,
    masked_reply_content,
    newton_reply_content,
    read_fingerprint_query_msg,
    read_newton_query,
    read_posterior,
    read_request,
    read_request_config,
    train_reply_content,
)

log = logging.getLogger(__name__)

app = ClientApp()

SITE_ERRORS: dict[str, tuple[int, str]] = {
    "config": (1001, "the site refused its configuration or the run's settings"),
    "plan": (
        1004,
        "the site refused the federation's plan (its data would be unusable)",
    ),
    "data": (1002, "the site could not read or prepare its data"),
    "site": (1003, "the site could not complete the task"),
    "secure": (
        1005,
        "the site requires secure aggregation and the round was not securely "
        "aggregated",
    ),
    "internal": (1099, "the site failed with an unexpected error"),
}
"""Error codes a site replies with (Flower's own codes are below 100); the
reason text is fixed, so no case id, path or exception text leaves the site."""


def error_reply(msg: Message, error: BaseException, task: str) -> Message:
    """Log ``error`` in full here; reply with its code and a fixed message."""
    kind = (
        "secure"
        if isinstance(error, SecureAggregationRequired)
        else "plan"
        if isinstance(error, PlanRefused)
        else "config"
        if isinstance(error, ConfigError)
        else "data"
        if isinstance(error, DataError)
        else "site"
        if isinstance(error, MoeflError)
        else "internal"
    )
    code, text = SITE_ERRORS[kind]
    log.error(
        "%s failed (code %d, sent to the server as such)", task, code, exc_info=error
    )
    return Message(
        Error(code=code, reason=f"moefl-{kind}: {text}; details are in the site's log"),
        reply_to=msg,
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training on the site's split; an error reply with a code on failure."""
    try:
        request, arrays = read_request(msg)
        reply = train_round(request, arrays, dict(context.node_config))
        return Message(train_reply_content(reply), reply_to=msg)
    except Exception as e:
        return error_reply(msg, e, "training")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Validation counts and sums; an error reply with a code on failure."""
    try:
        request, arrays = read_request(msg)
        site, values = evaluate_round(
            request, arrays, dict(context.node_config), read_posterior(msg)
        )
        return Message(evaluation_content(site, values), reply_to=msg)
    except Exception as e:
        return error_reply(msg, e, "evaluation")


@app.query("fingerprint")
def fingerprint(msg: Message, context: Context) -> Message:
    """The planning query: the site's dataset fingerprint (aggregate counts;
    noised and charged to the site's DP ledger under a ``privacy`` section)."""
    try:
        run_config = read_fingerprint_query_msg(msg)
        reply = fingerprint_round(run_config, dict(context.node_config))
        return Message(fingerprint_content(reply), reply_to=msg)
    except Exception as e:
        return error_reply(msg, e, "fingerprinting")


@app.query("newton")
def newton(msg: Message, context: Context) -> Message:
    """One Newton step's sums for the linear head (gradients, Hessians and
    log-likelihoods summed over the site's patients; refused at a DP site)."""
    try:
        request, arrays, beta = read_newton_query(msg)
        reply = newton_round(request, arrays, beta, dict(context.node_config))
        return Message(newton_reply_content(reply), reply_to=msg)
    except Exception as e:
        return error_reply(msg, e, "the Newton query")


# -- secure aggregation (four waves; client/node/secure_round.py) -----------


def _state(context: Context) -> dict[str, Any]:
    record = context.state.config_records.get(SECAGG)
    return dict(record) if record is not None else {}


def _keep(context: Context, state: dict[str, Any]) -> None:
    context.state.config_records[SECAGG] = ConfigRecord(state)


def _named(msg: Message, state: dict[str, Any], record: ConfigRecord) -> Message:
    """A reply of the site named in ``state`` carrying ``record``."""
    info = ConfigRecord({SITE: state["site"]})
    return Message(RecordDict({SECAGG: record, INFO: info}), reply_to=msg)


@app.query("secagg_keys")
def secagg_keys(msg: Message, context: Context) -> Message:
    """Wave 1: the site's public keys and the groups it will train."""
    try:
        request = read_request_config(msg)
        reply, state = keys_round(
            KeysQuery.read(msg.content), request, dict(context.node_config)
        )
        _keep(context, state)
        return _named(msg, state, reply.record())
    except Exception as e:
        return error_reply(msg, e, "secure aggregation's key exchange")


@app.query("secagg_shares")
def secagg_shares(msg: Message, context: Context) -> Message:
    """Wave 2: the site's encrypted shares, one per peer."""
    try:
        ciphertexts, state = shares_round(
            SharesQuery.read(msg.content), _state(context)
        )
        _keep(context, state)
        return _named(msg, state, shares_reply(ciphertexts))
    except Exception as e:
        return error_reply(msg, e, "secure aggregation's share exchange")


@app.train("secagg")
def secagg_train(msg: Message, context: Context) -> Message:
    """Wave 3: local training, the update clipped, packed and masked."""
    try:
        request, arrays = read_request(msg)
        query = MaskedQuery.read(msg.content)
        trained, masked, state = masked_round(
            query, request, arrays, dict(context.node_config), _state(context)
        )
        _keep(context, state)
        return Message(masked_reply_content(trained, masked.records()), reply_to=msg)
    except Exception as e:
        return error_reply(msg, e, "securely aggregated training")


@app.query("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Wave 4: one share per peer, to remove the masks from the sum."""
    try:
        revealed, state = unmask_round(UnmaskQuery.read(msg.content), _state(context))
        _keep(context, state)
        return _named(msg, state, unmask_reply(revealed))
    except Exception as e:
        return error_reply(msg, e, "secure aggregation's unmasking")
