"""A site's long-lived ClientApp process: it serves every message its SuperNode receives.

In its default (subprocess) isolation a Flower 1.42 SuperNode starts a fresh `flwr-clientapp`
process for every message, which imports JAX and compiles the local epoch again (about 200 s
a round on a loaded 2-core machine). Started with `--isolation process`, the SuperNode leaves
that to an outside process that claims tasks on its Runtime API. This module is that process,
and it stays up: each task runs `ultrajax.fl.client:app` in this interpreter, so JAX is
imported once and the site's compiled step (client.py's cached Site) serves every round.

Per task it does what `flwr-clientapp` does: claim the task (a token), pull the message and
the node's context, run the ClientApp (an exception becomes an error reply, as Flower's own
runner makes it), push the reply and the context (SecAgg+ keeps its keys there between
messages) and report the task finished, with heartbeats while it trains. Tasks run in threads
(see `serve`); the SuperNode hands out one message at a time, so they do not overlap.
"""

from __future__ import annotations

import threading
import time

import httpx
from absl import logging
from flwr.app import Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output


def _client(address: str, certificates: bytes | None, token: str | None = None, max_wait_s=None):
  """A Runtime API client that retries an unreachable SuperNode (Flower's invoker: forever, or
  until `max_wait_s` seconds have passed, then raises)."""
  interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
  if token is not None:
    interceptors.append(RuntimeTokenHttpInterceptor(token))
  retry = make_simple_http_retry_invoker()
  retry.max_time = max_wait_s
  return RuntimeHttpClient.from_server_address(
    server_address=address,
    insecure=certificates is None,
    root_certificates=certificates,
    interceptors=interceptors,
    retry_invoker=retry,
  )


def _alive(client) -> bool:
  """Whether the SuperNode still holds the task open (False once it finished or failed it).
  Unlike Flower's runner, which raises SIGINT on a refused heartbeat, this process must
  outlive a task whose run was stopped."""
  try:
    return bool(client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success)
  except httpx.TransportError:
    return True  # unknown: keep going


class _StopWaitingWhenCancelled:
  """The task's Runtime API client; an object that is not there yet counts as missing once the
  task is no longer open. Flower's pull retries a missing-yet object for up to two hours, and
  the SuperNode fails the task and never delivers the object when the run stops while it pulls
  the message (a ServerApp killed mid-round); this process would block every later task."""

  def __init__(self, client):
    self._client = client

  def __getattr__(self, name):
    return getattr(self._client, name)

  def PullObject(self, request):  # noqa: N802 - Flower's method name
    res = self._client.PullObject(request)
    if res.object_found and not res.object_available and not _alive(self._client):
      res.object_found = False  # Flower's puller gives up on a missing object
    return res


def run_task(address: str, token: str, app: ClientApp, certificates: bytes | None) -> None:
  """Runs one claimed ClientApp task to its end (reply pushed, task finished)."""
  client = _client(address, certificates, token)
  heartbeat = HeartbeatSender(lambda: _alive(client))
  heartbeat.start()
  context, status, details = None, SubStatus.FAILED, "ClientApp failed"
  try:
    message, context, run, _ = pull_task_input(_StopWaitingWhenCancelled(client))
    try:
      reply = app(message=message, context=context)
      status, details = SubStatus.COMPLETED, ""
    except Exception as e:  # noqa: BLE001 - the site's failure becomes its error reply
      logging.exception("run %d: the ClientApp raised", run.run_id)
      details = f"{type(e).__name__}: {e}"
      reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, details), reply_to=message)
    push_message(client, reply, context)
  finally:
    heartbeat.stop()
    push_task_output(client=client, context=context, sub_status=status, details=details)
    client.close()


def _run_logged(address, token, app, certificates, task) -> None:
  try:
    run_task(address, token, app, certificates)
  except Exception:  # noqa: BLE001 - a task that could not run; the next ones still do
    logging.exception("task %d of run %d failed", task.task_id, task.run_id)


def serve(
  address: str,
  app: ClientApp,
  certificates: bytes | None = None,
  poll_s=0.5,
  supernode_exit=lambda: None,
) -> None:
  """Claims and runs the ClientApp tasks of the SuperNode whose Runtime API is at `address`
  (host:port) until killed, asking for one every poll_s seconds (the SuperNode itself asks the
  SuperLink for messages every 3 s; at 0.2 s an idle site and its SuperNode spent 2% of a core).
  `supernode_exit()` is the SuperNode process's exit status, None while it runs: once it has
  exited (a wrong flag, a SuperLink it gave up on), this raises instead of waiting for it.

  Each task runs in a thread of its own. The SuperNode hands out one message at a time, but a
  task can hang: when a run stops while the SuperNode pulls its message, the SuperNode drops
  the message without closing the task, and Flower's pull waits up to two hours for its
  content. A stuck task then only holds its thread, as a stuck `flwr-clientapp` process holds
  only itself."""
  claims = _client(address, certificates, max_wait_s=5.0)  # then asks supernode_exit()
  while True:
    try:
      res = claims.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    except httpx.TransportError:  # the SuperNode is starting, or has exited
      if (status := supernode_exit()) is not None:
        raise RuntimeError(
          f"the site's SuperNode exited with status {status} (its log is above); start the "
          "site again once it is fixed"
        ) from None
      time.sleep(1.0)
      continue
    if res.HasField("task") and res.token:
      args = (address, res.token, app, certificates, res.task)
      threading.Thread(target=_run_logged, args=args, daemon=True).start()
    else:
      time.sleep(poll_s)
