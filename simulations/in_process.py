"""The sites' real ClientApp, called in this process behind Flower's Grid
interface: the coordinator's loop (:func:`server.server_app.run_federation`)
runs against it without Flower's simulation runtime, one node per simulated
partition, each with its own ``context.state`` kept across messages.

``observe`` sees every reply the coordinator receives (what a curious
coordinator holds); ``drop`` decides, per node, message type and round, that the
node does not answer that message (a site that drops out of a round).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context, Message, RecordDict

FIRST_NODE = 1000


class InProcessGrid:
    """Nodes ``FIRST_NODE + i`` serve partitions ``i`` of the run's cohort."""

    def __init__(
        self,
        app: Any,
        n_sites: int,
        *,
        observe: Callable[[Message], None] | None = None,
        drop: Callable[[int, str, int], bool] | None = None,
    ) -> None:
        self.app = app
        self.observe = observe
        self.drop = drop
        self.contexts = {
            FIRST_NODE + i: Context(
                run_id=0,
                node_id=FIRST_NODE + i,
                node_config={"partition-id": i, "num-partitions": n_sites},
                state=RecordDict(),
                run_config={},
            )
            for i in range(n_sites)
        }
        self.sent: list[str] = []  # message types, in the order sent

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: list[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            self.sent.append(kind)
            rnd = _round(msg)
            if self.drop is not None and self.drop(node, kind, rnd):
                continue
            reply = self.app(msg, self.contexts[node])
            reply.metadata.__dict__["_src_node_id"] = node
            if self.observe is not None:
                self.observe(reply)
            replies.append(reply)
        return replies


def _round(msg: Message) -> int:
    for record in msg.content.config_records.values():
        for key in ("server-round", "round"):
            value = record.get(key)
            if isinstance(value, int):
                return value
    return 0


def node_sites_of(names: Mapping[int, str]) -> Callable[[Any], dict[int, str]]:
    """The grid's node -> site map, as :func:`server.server_app.run_federation`
    takes it."""
    return lambda grid: dict(names)
