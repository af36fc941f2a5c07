"""Flower records for the messages of :mod:`shared_model.messages`.

The ClientApp and the ServerApp pack and read every message here, so each key
is written once and the server never imports site code. What arrives from the
other party is untrusted: the readers refuse a malformed message with a
ValueError (server side) or a ConfigError (site side) that says what is wrong,
and the caller decides what that costs (the server excludes the site for the
round; the site replies with an error code).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from shared_model.errors import ConfigError
from shared_model.federation_config import is_site_name
from shared_model.messages import (
    ARRAYS,
    CONFIG,
    DECLINED,
    FINGERPRINT,
    INFO,
    METRICS,
    SITE,
    WITHHELD,
    FingerprintReply,
    RoundRequest,
    SiteTrainReply,
    TrainReply,
    fingerprint_query_values,
    read_fingerprint_query,
)
from shared_model.newton_messages import GLM, NEWTON_QUERY, NewtonReply
from shared_model.posterior import Posterior


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays as a Flower ArrayRecord (C-contiguous copies)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """A Flower ArrayRecord as named numpy arrays."""
    return {k: v.numpy() for k, v in record.items()}


def request_record(request: RoundRequest) -> ConfigRecord:
    """The coordinator's request as the ConfigRecord sent with the weights."""
    return ConfigRecord(request.to_values())


def read_request(msg: Message) -> tuple[RoundRequest, dict[str, np.ndarray]]:
    """A site reads the round's request and the global weights it carries."""
    content = msg.content
    if CONFIG not in content.config_records or ARRAYS not in content.array_records:
        raise ConfigError("the round's message lacks its config or its weights")
    request = RoundRequest.from_values(dict(content.config_records[CONFIG]))
    return request, record_to_arrays(content.array_records[ARRAYS])


def read_request_config(msg: Message) -> RoundRequest:
    """A site reads the round's request from a message without weights."""
    if CONFIG not in msg.content.config_records:
        raise ConfigError("the message lacks the round's config")
    return RoundRequest.from_values(dict(msg.content.config_records[CONFIG]))


def masked_reply_content(reply: SiteTrainReply, records: dict[str, Any]) -> RecordDict:
    """A securely aggregated training reply: ``records`` (the masked vector and
    the small-group releases), the site's name, its DP accounting and its
    seconds; no counts, steps or losses (they would describe its data)."""
    info: dict[str, Any] = {SITE: reply.site}
    if reply.declined is not None:
        info[DECLINED] = reply.declined
    meta = TrainReply(
        counts={}, seconds=reply.reply.seconds, privacy=reply.reply.privacy
    )
    return RecordDict(
        {
            **records,
            METRICS: MetricRecord(meta.to_values()),
            INFO: ConfigRecord(info),
        }
    )


def read_masked_reply_meta(msg: Message) -> SiteTrainReply:
    """The server reads a masked reply's name, accounting and seconds (the
    caller reads its masked records); ValueError says what is wrong."""
    if msg.has_error():
        raise ValueError(f"site reported an error: {error_text(msg)}")
    site = claimed_site(msg)
    if site is None:
        raise ValueError(f"the reply names no valid site (`{INFO}` record, `{SITE}`)")
    info = msg.content.config_records[INFO]
    extra = sorted(set(info.keys()) - {SITE, DECLINED})
    if extra:
        raise ValueError(f"unexpected key `{extra[0][:40]}` in the `{INFO}` record")
    if METRICS not in msg.content.metric_records:
        raise ValueError("the reply lacks its metrics")
    reply = TrainReply.from_values(dict(msg.content.metric_records[METRICS]))
    if any(reply.counts.values()) or reply.steps is not None or reply.losses:
        raise ValueError("a masked reply carries counts, steps or losses")
    declined = info.get(DECLINED)
    if declined is not None and not isinstance(declined, str):
        raise ValueError(f"`{DECLINED}` is not a text")
    reason = None if declined is None else _printable(declined, MAX_DECLINE_REASON)
    return SiteTrainReply(site, reply, declined=reason)


def train_reply_content(reply: SiteTrainReply) -> RecordDict:
    """A site's training reply as the content of a Flower message."""
    info: dict[str, Any] = {SITE: reply.site}
    records: dict[str, Any] = {METRICS: MetricRecord(reply.reply.to_values())}
    if reply.declined is not None:
        info[DECLINED] = reply.declined
    else:
        records[ARRAYS] = arrays_to_record(dict(reply.arrays))
    return RecordDict({**records, INFO: ConfigRecord(info)})


def evaluation_content(site: str, values: dict[str, Any] | str) -> RecordDict:
    """A site's evaluation reply: its counts and sums, or (a string) the reason
    it withholds them."""
    if isinstance(values, str):
        return RecordDict({INFO: ConfigRecord({SITE: site, WITHHELD: values})})
    return RecordDict({METRICS: MetricRecord(values), INFO: ConfigRecord({SITE: site})})


def claimed_site(msg: Message) -> str | None:
    """The site name a reply gives itself, when it is a valid site name (None:
    an error reply, no name, or one that is not a site name)."""
    try:
        if not msg.has_content():
            return None
        info = msg.content.config_records.get(INFO)
        name = None if info is None or SITE not in info else info[SITE]
    except Exception:  # a malformed reply
        return None
    return name if is_site_name(name) else None


MAX_DECLINE_REASON = 500
"""Characters of a declined round's reason kept in the run record."""


def _verify_layout(
    content: RecordDict, records: dict[str, set[str]], info_keys: set[str]
) -> None:
    """Only the records (name -> kind) and info keys a reply of this kind has;
    ValueError names the first stranger."""
    kinds: dict[str, list[str]] = {
        "arrays": list(content.array_records),
        "metrics": list(content.metric_records),
        "config": list(content.config_records),
    }
    for kind, present in kinds.items():
        extra = sorted(k for k in present if kind not in records.get(k, set()))
        if extra:
            raise ValueError(f"unexpected {kind} record `{extra[0][:40]}` in the reply")
    info = content.config_records.get(INFO)
    extra = sorted(set(info.keys() if info is not None else ()) - info_keys)
    if extra:
        raise ValueError(f"unexpected key `{extra[0][:40]}` in the `{INFO}` record")


def read_train_reply(msg: Message) -> SiteTrainReply:
    """The server reads an untrusted training reply; ValueError says what is
    wrong with it (an error reply included)."""
    if msg.has_error():
        raise ValueError(f"site reported an error: {error_text(msg)}")
    site = claimed_site(msg)
    if site is None:
        raise ValueError(f"the reply names no valid site (`{INFO}` record, `{SITE}`)")
    content = msg.content
    info = content.config_records[INFO]
    try:
        values = dict(content.metric_records[METRICS])
        if DECLINED in info:  # no weights: only its DP accounting is read
            _verify_layout(
                content, {METRICS: {"metrics"}, INFO: {"config"}}, {SITE, DECLINED}
            )
            reason = info[DECLINED]
            if not isinstance(reason, str):
                raise ValueError(f"`{DECLINED}` is not a text")
            account = TrainReply.from_values(values).privacy
            reply = TrainReply(counts={}, privacy=account)
            if account is None:
                raise ValueError("a declined round's reply lacks its DP accounting")
            return SiteTrainReply(
                site, reply, declined=_printable(reason, MAX_DECLINE_REASON)
            )
        _verify_layout(
            content,
            {ARRAYS: {"arrays"}, METRICS: {"metrics"}, INFO: {"config"}},
            {SITE},
        )
        reply = TrainReply.from_values(values)
        arrays = record_to_arrays(content.array_records[ARRAYS])
    except KeyError as e:
        raise ValueError(f"malformed reply (no {e})") from e
    except TypeError as e:
        raise ValueError(f"malformed reply ({e})") from e
    return SiteTrainReply(site, reply, arrays)


def _printable(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, control characters replaced: it
    goes into logs and the run record."""
    cut = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return cut + ("..." if len(text) > limit else "")


def error_text(msg: Message) -> str:
    """An error reply's code and reason, made safe for logs and records (a
    site's reason is untrusted text)."""
    error = msg.error
    return f"code {getattr(error, 'code', '?')}: " + _printable(
        str(getattr(error, "reason", "")), MAX_DECLINE_REASON
    )


def read_evaluation_reply(msg: Message) -> dict[str, Any] | None:
    """An untrusted evaluation reply's values; None when the site withholds
    them. ValueError says what is wrong."""
    if msg.has_error():
        raise ValueError(f"site reported an error: {error_text(msg)}")
    content = msg.content
    info = content.config_records.get(INFO)
    _verify_layout(content, {METRICS: {"metrics"}, INFO: {"config"}}, {SITE, WITHHELD})
    if METRICS not in content.metric_records:
        if info is not None and WITHHELD in info:
            return None
        raise ValueError(f"the reply has no `{METRICS}` record")
    return dict(content.metric_records[METRICS])


POSTERIOR = "posterior"
"""The arrays record of a request that carries the posterior over the head."""


def with_posterior(content: RecordDict, posterior: Posterior | None) -> RecordDict:
    """``content`` with the posterior's arrays added (when there is one)."""
    if posterior is not None:
        content[POSTERIOR] = arrays_to_record(posterior.to_arrays())
    return content


def read_posterior(msg: Message) -> Posterior | None:
    """The posterior a request carries (None: none); ConfigError when malformed."""
    record = msg.content.array_records.get(POSTERIOR)
    if record is None:
        return None
    try:
        return Posterior.from_arrays(record_to_arrays(record))
    except (KeyError, ValueError) as e:
        raise ConfigError(f"the request's posterior is unusable ({e})") from e


NEWTON_MESSAGE = f"query.{NEWTON_QUERY}"
"""The message type of a Newton query (the ClientApp's ``@app.query("newton")``)."""


def newton_query(
    request: RoundRequest, arrays: dict[str, np.ndarray], beta: np.ndarray
) -> RecordDict:
    """A Newton query: the request, the global weights and the candidates'
    coefficients ``(K, 4, P)``."""
    return RecordDict(
        {
            ARRAYS: arrays_to_record(arrays),
            CONFIG: request_record(request),
            GLM: arrays_to_record({"beta": np.asarray(beta, np.float64)}),
        }
    )


def read_newton_query(
    msg: Message,
) -> tuple[RoundRequest, dict[str, np.ndarray], np.ndarray]:
    """A site reads a Newton query; ConfigError when malformed."""
    request, arrays = read_request(msg)
    record = msg.content.array_records.get(GLM)
    beta = None if record is None else record_to_arrays(record).get("beta")
    if beta is None or beta.ndim != 3 or not np.isfinite(beta).all():
        raise ConfigError("the Newton query lacks finite coefficients (K, 4, P)")
    return request, arrays, beta.astype(np.float64)


def newton_reply_content(reply: NewtonReply) -> RecordDict:
    """A site's answer to a Newton query."""
    return RecordDict(
        {
            GLM: arrays_to_record(reply.arrays()),
            METRICS: MetricRecord(dict[str, Any](reply.values())),
            INFO: ConfigRecord({SITE: reply.site}),
        }
    )


def read_newton_reply(
    msg: Message, site: str, *, candidates: int, size: int, features: int
) -> NewtonReply:
    """The server reads an untrusted Newton reply from ``site``; ValueError
    says what is wrong (an error reply included)."""
    if msg.has_error():
        raise ValueError(f"site reported an error: {error_text(msg)}")
    content = msg.content
    _verify_layout(
        content, {GLM: {"arrays"}, METRICS: {"metrics"}, INFO: {"config"}}, {SITE}
    )
    try:
        arrays = record_to_arrays(content.array_records[GLM])
        values = dict(content.metric_records[METRICS])
    except KeyError as e:
        raise ValueError(f"malformed reply (no {e})") from e
    return NewtonReply.read(
        site, arrays, values, candidates=candidates, size=size, features=features
    )


FINGERPRINT_QUERY = "query.fingerprint"
"""The message type of the planning query (Flower routes it to the
ClientApp's ``@app.query("fingerprint")``)."""


def fingerprint_query(run_config: dict[str, Any]) -> RecordDict:
    """The planning query's content."""
    return RecordDict({CONFIG: ConfigRecord(fingerprint_query_values(run_config))})


def read_fingerprint_query_msg(msg: Message) -> dict[str, Any]:
    """A site reads the planning query: the federation's run config."""
    if CONFIG not in msg.content.config_records:
        raise ConfigError("the planning query lacks its config")
    return read_fingerprint_query(dict(msg.content.config_records[CONFIG]))


def fingerprint_content(reply: FingerprintReply) -> RecordDict:
    """A site's answer to the planning query."""
    return RecordDict(
        {
            INFO: ConfigRecord(reply.info_values()),
            METRICS: MetricRecord(dict[str, Any](reply.metric_values())),
        }
    )


def read_fingerprint_reply(msg: Message) -> FingerprintReply:
    """The server reads an untrusted planning reply; ValueError says what is
    wrong (an error reply included)."""
    if msg.has_error():
        raise ValueError(f"site reported an error: {error_text(msg)}")
    content = msg.content
    _verify_layout(
        content, {METRICS: {"metrics"}, INFO: {"config"}}, {SITE, FINGERPRINT}
    )
    if INFO not in content.config_records:
        raise ValueError(f"the reply has no `{INFO}` record")
    metrics = content.metric_records.get(METRICS)
    return FingerprintReply.from_values(
        dict(content.config_records[INFO]), dict(metrics or {})
    )
