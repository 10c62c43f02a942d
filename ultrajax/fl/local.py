"""A Flower `Grid` that hands each message straight to a `ClientApp` in this process.

The ServerApp and ClientApp code, Flower's Message / RecordDict types, the ClientApp's mods
(SecAgg+) and the SecAgg+ workflow all run as in a deployment; only the transport (SuperLink,
SuperNodes, one process per ClientApp call) is replaced by a function call. Each node keeps
its own `Context` (its node config and the state Flower keeps between a node's messages, which
SecAgg+ uses), as a SuperNode does. Used by the tests and for a dry run on one machine; Flower's
own simulation runtime needs Ray, which ultrajax does not install.

Failures, as a SuperLink sees them: `down` holds node ids that no longer answer (a site that
was switched off); `lose_reply[node]` holds the indices (0-based, counting that node's
messages) of the messages whose reply is lost: the ClientApp ran, then its process was killed
before the reply left (killed mid-round). A ClientApp that raises answers with an error reply.
"""

from __future__ import annotations

import copy
import uuid

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


class LocalGrid(Grid):
  """Nodes 1..N, each a ClientApp call with its own Context (node config from the list)."""

  def __init__(self, client_app: ClientApp, node_configs: list[dict], run_id: int = 1):
    self.client_app = client_app
    self.contexts = {
      i + 1: Context(
        run_id=run_id, node_id=i + 1, node_config=dict(nc), state=RecordDict(), run_config={}
      )
      for i, nc in enumerate(node_configs)
    }
    self._run = Run.create_empty(run_id)
    # What a ServerApp process learns from the SuperLink: its run, and that it is the server.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = (run_id, SUPERLINK_NODE_ID, 0)
    self.down: set[int] = set()
    self.lose_reply: dict[int, set[int]] = {}
    self._count = dict.fromkeys(self.contexts, 0)
    self._replies: dict[str, Message] = {}

  def set_run(self, run: Run) -> None:
    self._run = run

  @property
  def run(self) -> Run:
    return self._run

  def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
    return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

  def get_node_ids(self):
    return [n for n in self.contexts if n not in self.down]

  def _deliver(self, msg: Message) -> Message | None:
    node = msg.metadata.dst_node_id
    if node in self.down or node not in self.contexts:
      return None
    index, self._count[node] = self._count[node], self._count[node] + 1
    msg = copy.deepcopy(msg)  # each node gets its own copy, as over the wire (mods mutate it)
    try:
      reply = self.client_app(message=msg, context=self.contexts[node])
    except Exception as e:  # noqa: BLE001 - a site's failure becomes its error reply
      reply = Message(
        Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(e).__name__}: {e}"), reply_to=msg
      )
    return None if index in self.lose_reply.get(node, ()) else reply

  def push_messages(self, messages):
    ids = []
    for msg in messages:
      msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
      reply = self._deliver(msg)
      if reply is not None:
        self._replies[msg.metadata.message_id] = reply
      ids.append(msg.metadata.message_id)
    return ids

  def pull_messages(self, message_ids):
    return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

  def send_and_receive(self, messages, *, timeout=None):
    del timeout  # every reply is ready when push_messages returns
    return self.pull_messages(self.push_messages(messages))
