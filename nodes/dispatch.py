"""The node's control endpoint ``<node>/ctl``: receive REQUESTs, validate, dispatch by method, answer.

One table maps a method to its handler. Every request body is checked once, here, by
:func:`~dpipes.nodes.protocol.parse_request`, so a handler gets the typed request
(:mod:`dpipes.nodes.protocol`) and the caller's address, and returns the typed reply. Each request
is answered in a task of its own (a ``run`` waits for whole negotiations; a ``cancel`` must not
wait behind it). The answer is the handler's reply, or a failed REPLY whose body carries the code
(the protocol's *Errors*):

* a method not in the table: ``unknown-method``;
* a body that is not of the method's shape: ``bad-request``, naming the field;
* a :class:`~dpipes.nodes.protocol.ControlError` from the handler: its code and message;
* any other :class:`~dpipes.bus.errors.DpipesError`: ``internal``, its message (a handler that
  lets one through has not said what it means: logged, once per method and type);
* anything else is a bug: logged with its traceback, answered ``internal``.

Malformed requests are counted per method and logged once per ``MALFORMED_LOG_INTERVAL_S``, never
a traceback per message. Messages on the endpoint that are not requests are ignored.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

from dpipes.bus import codec
from dpipes.bus.endpoint import Endpoint
from dpipes.bus.errors import DpipesError
from dpipes.nodes.protocol import INTERNAL, UNKNOWN_METHOD, BadRequest, Body, ControlError, parse_request

log = logging.getLogger(__name__)

MALFORMED_LOG_INTERVAL_S = 60.0  # one warning per method and interval for malformed requests, however many

Handler = Callable[[Any, str], Awaitable[Body]]
"""``(typed request, caller's address) -> typed reply``."""
Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any]"]


class ControlServer:
    """Serves one control endpoint.

    Args:
        node: the node's name, for messages.
        ctl: the control endpoint.
        handlers: method name -> handler.
        spawn: starts a task the node tracks (and cancels when it closes).
    """

    def __init__(self, node: str, ctl: Endpoint, handlers: Mapping[str, Handler], *, spawn: Spawn) -> None:
        self.node = node
        self.ctl = ctl
        self.handlers = dict(handlers)
        self._spawn = spawn
        self.malformed: collections.Counter[str] = collections.Counter()  # method -> refused requests
        self._logged_at: dict[str, float] = {}
        self._uncoded: set[tuple[str, type[BaseException]]] = set()

    async def serve(self) -> None:
        """Answer requests until cancelled."""
        while True:
            msg = await self.ctl.recv()
            if not isinstance(msg, codec.Request):
                continue
            handler = self.handlers.get(msg.method)
            try:
                if handler is None:
                    raise ControlError(UNKNOWN_METHOD, f"node {self.node} has no method {msg.method!r:.64}")
                request = parse_request(msg.method, msg.body)
            except ControlError as exc:
                self._refused(msg, exc)
                continue
            self._spawn(self._answer(handler, request, msg), f"{msg.method} from {msg.src}")

    async def _answer(self, handler: Handler, request: Body, msg: codec.Request) -> None:
        try:
            reply = await handler(request, msg.src)
        except BadRequest as exc:
            self._refused(msg, exc)
        except ControlError as exc:
            self.ctl.reply(msg, exc.body(), error=str(exc))
        except DpipesError as exc:
            if (msg.method, type(exc)) not in self._uncoded:
                self._uncoded.add((msg.method, type(exc)))
                kind = type(exc).__name__
                log.warning("node %s: %s answered without a code: %s: %s", self.node, msg.method, kind, exc)
            self.ctl.reply(msg, ControlError(INTERNAL, str(exc)).body(), error=str(exc))
        except Exception as exc:
            log.exception("node %s: %s failed", self.node, msg.method)
            error = ControlError(INTERNAL, f"node {self.node}: internal error in {msg.method}: {exc!r}")
            self.ctl.reply(msg, error.body(), error=str(error))
        else:
            self.ctl.reply(msg, reply.to_body())

    def _refused(self, msg: codec.Request, exc: ControlError) -> None:
        """Answer a request that is not of its method's shape: coded, counted, logged once per interval."""
        # Counted by method, and every unknown method under one key: a sender cannot grow the table.
        method = msg.method if msg.method in self.handlers else "(unknown method)"
        self.malformed[method] += 1
        now = time.monotonic()
        if now - self._logged_at.get(method, -MALFORMED_LOG_INTERVAL_S) >= MALFORMED_LOG_INTERVAL_S:
            self._logged_at[method] = now
            log.warning(
                "node %s: refused %s from %s: %s (%d so far)", self.node, method, msg.src, exc, self.malformed[method]
            )
        self.ctl.reply(msg, exc.body(), error=str(exc))


__all__ = ["ControlServer", "Handler"]
