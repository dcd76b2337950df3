"""The client's side of a direct read: the last stage's output, read at that stage's node.

When the last stage of a run is on another node, its stdout would travel that node -> its hub ->
the entry node's hub -> the client. A client that asks (``run.direct_read``) gets, in the run
reply, that node's bus endpoint and key and a one-time token under which the stage holds its
stdout (protocol: ``claim``). :func:`claim_output` attaches to that node's hub (at its Unix
socket when it is a daemon of ours on this host; else over TCP, with CURVE when the node has keys,
as any remote client: the node authenticates our key and takes the claim only from the stage's own
caller) and claims the output there, so it crosses the network once and skips the entry hub.
When that cannot be done (nothing answers, our key is refused, the node refuses the claim from
us), it claims through the entry node instead, and the output takes the old path. The stage
reads none of its output before a claim is taken, and takes one claim only: every byte goes to
the one reader chosen, none is lost or doubled.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import zmq

from dpipes.bus.auth import ClientCurve
from dpipes.bus.client import Client
from dpipes.bus.endpoint import Endpoint
from dpipes.bus.errors import BusError, DpipesError
from dpipes.bus.keyring import Keyring
from dpipes.bus.keys import CLIENT_KEY, KeyPair, PublicKey
from dpipes.nodes.entry import EntryKeys
from dpipes.nodes.paths import node_files
from dpipes.nodes.protocol import CONTROL_TIMEOUT_S, CTL, NOT_FOUND, ClaimRequest, ControlError, RunReply, call
from dpipes.nodes.runtime_dir import runtime_dir_path

log = logging.getLogger(__name__)

DIRECT_ATTACH_TIMEOUT_S = 3.0  # a hub answers ATTACH at once; the output waits meanwhile, so give up soon


async def claim_output(entry: Endpoint, reply: RunReply, keys: EntryKeys | None) -> Client | None:
    """Claim the last stage's held output: at its node, then the attached client its streams will
    reach (the caller closes it); else through ``entry`` (our endpoint at the entry node), then None.

    Args:
        keys: how we attached to the entry node over TCP (our key is the one that node named as
            the run's caller); None over ipc, where the caller was our own client key.

    Raises:
        ControlError: neither claim was taken (the token is wrong or was used: a bug or a forgery).
        BusError: the entry node did not answer the claim.
    """
    last = reply.stages[-1]
    claim = ClaimRequest(pipeline=reply.pipeline, stage=last.index, token=reply.read_token)
    ctl = f"{last.node}/{CTL}"
    maybe: Client | None = None  # a direct claim whose answer was lost: it may have been taken all the same
    for where in _direct_endpoints(reply):
        client = await _attach(where, reply, keys)
        if client is None:
            continue
        try:
            await call(client.endpoint, ctl, claim, timeout=CONTROL_TIMEOUT_S)
        except ControlError as exc:  # refused (our key is not the caller's): the next way
            log.info("stage %d's output: node %s took no claim at %s: %s", last.index, last.node, where, exc)
            await client.aclose()
            continue
        except BusError as exc:  # no answer: ask no other way directly, lest two claims be taken
            log.info("stage %d's output: node %s did not answer our claim at %s: %s", last.index, last.node, where, exc)
            maybe = client
            break
        except BaseException:
            await client.aclose()
            raise
        log.info("stage %d's output: read at node %s (%s)", last.index, last.node, where)
        return client
    try:
        await call(entry, ctl, claim, timeout=CONTROL_TIMEOUT_S)
    except ControlError as exc:
        if maybe is not None and exc.code == NOT_FOUND:
            return maybe  # our direct claim was taken after all: the output comes there
        if maybe is not None:
            await maybe.aclose()
        raise
    except BaseException:
        if maybe is not None:
            await maybe.aclose()
        raise
    if maybe is not None:
        await maybe.aclose()
    log.info("stage %d's output: read through the entry node", last.index)
    return None


def _direct_endpoints(reply: RunReply) -> Iterator[str]:
    """Where to reach the last stage's node: a daemon of ours on this host of that name (its Unix
    socket in our runtime directory: no keys needed, and large payloads in shared memory), then
    the bus endpoint the entry node gave."""
    sock = node_files(runtime_dir_path(), reply.stages[-1].node).sock
    if sock.exists():
        yield f"ipc://{sock}"
    yield reply.read_endpoint


async def _attach(where: str, reply: RunReply, keys: EntryKeys | None) -> Client | None:
    """A client attached to the last stage's node at ``where``, or None when that cannot be done."""
    node = reply.stages[-1].node
    curve = None
    if reply.read_key and where.startswith("tcp://"):
        pair = keys.curve.keypair if keys is not None else _own_client_pair()
        if pair is None:
            return None
        try:
            curve = ClientCurve(pair, PublicKey.parse(reply.read_key))
        except ValueError:
            return None
    client = Client(where, curve=curve, attach_timeout=DIRECT_ATTACH_TIMEOUT_S)
    try:
        await client.start()
    except (DpipesError, OSError, zmq.ZMQError) as exc:  # refused, nothing answers, a bad endpoint
        log.info("cannot attach to node %s at %s: %s", node, where, exc)
        await client.aclose()
        return None
    except BaseException:  # cancelled (Ctrl-C twice): leave nothing open
        await client.aclose()
        raise
    if client.endpoint.node != node:  # another daemon under that name's socket: not where the output is
        await client.aclose()
        return None
    return client


def _own_client_pair() -> KeyPair | None:
    """This user's client pair if it exists (what an entry node on our host names as its local
    user's key); never made here: a user without one reads through the entry node."""
    ring = Keyring()
    if not (ring.dir / f"{CLIENT_KEY}.key_secret").exists():
        return None
    try:
        return ring.client()[0]
    except DpipesError:
        return None
