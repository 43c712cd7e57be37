"""A Flower ``Grid`` that answers in this process with prepared replies: strategy-level tests and
the benchmark, where the deployment engine's transport would only add the same cost to every
strategy (``local_run`` runs the real engine).

Builds Flower's own ``Message`` objects, which outside a running Flower task needs the task
identity set (an internal of Flower's, as its own in-memory grid does).
"""

from __future__ import annotations

import itertools
from typing import Callable

from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp import Grid


def enter_flower_task() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class PreparedGrid(Grid):
    """Node ``i + 1`` answers every train message with ``reply(i, message)``; evaluate messages
    get ``num-examples: 1``. ``sent_bytes`` counts the arrays of every message sent."""

    def __init__(self, nodes: int, reply: Callable[[int, Message], RecordDict]):
        enter_flower_task()
        self.reply = reply
        self.node_ids = list(range(1, nodes + 1))
        self.sent_bytes: list[int] = []
        self._answers: dict[str, Message] = {}
        self._ids = itertools.count()
        self._run = None

    def set_run(self, run_id: int) -> None:
        self._run = run_id

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return list(self.node_ids)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            self.sent_bytes.append(sum(r.count_bytes() for r in
                                       message.content.array_records.values()))
            message_id = f"m{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = message_id
            node = message.metadata.dst_node_id
            content = (self.reply(node - 1, message) if message.metadata.message_type == "train"
                       else RecordDict({"metrics": MetricRecord({"num-examples": 1})}))
            answer = Message(content=content, reply_to=message)
            answer.metadata.__dict__["_src_node_id"] = node
            self._answers[message_id] = answer
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self._answers.pop(i) for i in list(message_ids) if i in self._answers]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(list(messages)))
