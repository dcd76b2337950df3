"""The node's control endpoint ``<node>/ctl``: receive REQUESTs, dispatch by method, answer.

One table maps a method name to its handler, an async function from the request to the reply's
body. Each request is answered in a task of its own (a ``run`` waits for whole negotiations; a
``cancel`` must not wait behind it). The answer is the handler's body, or an error:

* a method not in the table: ``node N has no method M``;
* a :class:`~dpipes.bus.errors.DpipesError` (a refusal, a bad pipeline): its message, as it is;
* a body missing a key or holding a wrong type: ``malformed M request: ...``;
* anything else is a bug: logged with its traceback, answered as an internal error.

Messages on the endpoint that are not requests (replies to requests of the node's own, which the
endpoint resolves itself, never reach here) are ignored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

from dpipes.bus import codec
from dpipes.bus.endpoint import Endpoint
from dpipes.bus.errors import DpipesError

log = logging.getLogger(__name__)

Handler = Callable[[codec.Request], Awaitable[dict[str, Any]]]
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

    async def serve(self) -> None:
        """Answer requests until cancelled."""
        while True:
            msg = await self.ctl.recv()
            if not isinstance(msg, codec.Request):
                continue
            handler = self.handlers.get(msg.method)
            if handler is None:
                self.ctl.reply(msg, error=f"node {self.node} has no method {msg.method!r}")
                continue
            self._spawn(self._answer(handler, msg), f"{msg.method} from {msg.src}")

    async def _answer(self, handler: Handler, msg: codec.Request) -> None:
        try:
            body = await handler(msg)
        except DpipesError as exc:
            self.ctl.reply(msg, error=str(exc))
        except (KeyError, TypeError, ValueError) as exc:
            self.ctl.reply(msg, error=f"malformed {msg.method} request: {exc!r}")
        except Exception as exc:
            log.exception("node %s: %s failed", self.node, msg.method)
            self.ctl.reply(msg, error=f"node {self.node}: internal error in {msg.method}: {exc!r}")
        else:
            self.ctl.reply(msg, body)


__all__ = ["ControlServer", "Handler"]
