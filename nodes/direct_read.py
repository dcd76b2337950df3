"""The client's side of a direct read: the last stage's output, read at that stage's node.

When the last stage of a run is on another node, its stdout would travel that node -> its hub ->
the entry node's hub -> the client. A client that asks (``run.direct_read``) gets, in the run
reply, that node's bus endpoint and key and a one-time token under which the stage holds its
stdout (protocol: ``claim``). :func:`claim_output` attaches to that node's hub (over TCP, with
CURVE when the node has keys, as any remote client: the node authenticates our key and takes the
claim only from the stage's own caller) and claims the output there, so it crosses the network
once and skips the entry hub. When that cannot be done (nothing answers, our key is refused, the
node refuses the claim from us), it claims through the entry node instead, and the output takes
the old path. The stage reads none of its output before a claim is taken, and takes one claim
only: every byte goes to the one reader chosen, none is lost or doubled.
"""

from __future__ import annotations

import logging

import zmq

from dpipes.bus.auth import ClientCurve
from dpipes.bus.client import Client
from dpipes.bus.endpoint import Endpoint
from dpipes.bus.errors import BusError, DpipesError
from dpipes.bus.keyring import Keyring
from dpipes.bus.keys import CLIENT_KEY, KeyPair, PublicKey
from dpipes.nodes.entry import EntryKeys
from dpipes.nodes.protocol import CONTROL_TIMEOUT_S, CTL, NOT_FOUND, ClaimRequest, ControlError, RunReply, call

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
    claim = ClaimRequest(pipeline=reply.pipeline, stage=reply.stages[-1].index, token=reply.read_token)
    client = await _attach(reply, keys)
    try:
        return await _claim(entry, client, claim, reply)
    except BaseException:  # refused both ways, or cancelled: nothing will come to it
        if client is not None:
            await client.aclose()
        raise


async def _claim(entry: Endpoint, client: Client | None, claim: ClaimRequest, reply: RunReply) -> Client | None:
    """``claim`` through ``client`` if we have one, else (or if that fails) through ``entry``; the
    client the output will reach, or None for the entry node (``client`` then closed)."""
    last = reply.stages[-1]
    ctl = f"{last.node}/{CTL}"
    maybe_taken = False  # a direct claim whose answer was lost may have been taken all the same
    if client is not None:
        try:
            await call(client.endpoint, ctl, claim, timeout=CONTROL_TIMEOUT_S)
            log.info("stage %d's output: read at node %s (%s)", last.index, last.node, reply.read_endpoint)
            return client
        except DpipesError as exc:  # refused (our key is not the caller's), or no answer
            log.info("stage %d's output: node %s took no claim from us directly: %s", last.index, last.node, exc)
            maybe_taken = isinstance(exc, BusError)
    try:
        await call(entry, ctl, claim, timeout=CONTROL_TIMEOUT_S)
    except ControlError as exc:
        if client is not None and maybe_taken and exc.code == NOT_FOUND:
            return client  # our direct claim was taken after all: the output comes there
        raise
    if client is not None:
        await client.aclose()
    log.info("stage %d's output: read through the entry node", last.index)
    return None


async def _attach(reply: RunReply, keys: EntryKeys | None) -> Client | None:
    """A client attached to the last stage's node, or None when that cannot be done."""
    curve = None
    if reply.read_key:
        pair = keys.curve.keypair if keys is not None else _own_client_pair()
        if pair is None:
            return None
        try:
            curve = ClientCurve(pair, PublicKey.parse(reply.read_key))
        except ValueError:
            return None
    client = Client(reply.read_endpoint, curve=curve, attach_timeout=DIRECT_ATTACH_TIMEOUT_S)
    try:
        await client.start()
    except (DpipesError, OSError, zmq.ZMQError) as exc:  # refused, nothing answers, a bad endpoint
        log.info("cannot attach to node %s at %s: %s", reply.stages[-1].node, reply.read_endpoint, exc)
        await client.aclose()
        return None
    except BaseException:  # cancelled (Ctrl-C twice): leave nothing open
        await client.aclose()
        raise
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
