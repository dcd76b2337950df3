"""The dpipes control protocol, version 2: how clients and nodes run pipelines. This docstring is the spec.

It rides on the bus (:mod:`dpipes.bus.codec`, whose docstring specifies frames, addresses,
streams, credit and ``ERROR``); everything here is a bus ``REQUEST``/``REPLY`` body or a bus
stream. A client written from the two docstrings alone can run a pipeline (``examples/``
holds one that imports only pyzmq and msgpack).

Endpoints
    Every node has a **control endpoint** ``<node>/ctl`` (``CTL``). A client attaches to a node's
    hub (codec: ``ATTACH``), which makes it an endpoint ``<node>/<name>`` of that node; that node
    is its **entry node**. Each stage of a run gets an endpoint on the node that runs it,
    ``<node>/<pipeline>.<index>`` (its **stage address**); stages are numbered from 0.

Calls
    A call is a ``REQUEST`` to ``<node>/ctl`` with ``method`` and ``body`` (a msgpack map); ``seq``
    is the caller's request id, unique among its outstanding requests. The node answers with one
    ``REPLY`` to the request's ``src`` with the same ``seq``:

    * success: ``ok = true``, ``body`` = the method's reply body (below);
    * failure: ``ok = false``, ``error`` = a sentence for a person, and ``body`` =
      ``{"code": CODE, "field": FIELD}``: one of the codes under *Errors*, and for
      ``bad-request`` the request field at fault (a dotted path such as ``stages.2.argv``),
      else ``""``. Callers act on ``code``, never on ``error``'s wording.

    Body maps have string keys. A key the receiver does not know is ignored (room for compatible
    additions without a version bump); a key it needs that is missing, of the wrong type or out of
    its bounds is ``bad-request`` naming it. Types: ``str`` (UTF-8, at most ``MAX_TEXT_CHARS``
    unless noted), ``int`` (msgpack integer, never a boolean), ``float`` (msgpack float or
    integer), ``bool``, ``list[T]`` (at most ``MAX_ITEMS`` items), ``map`` (any msgpack map with
    string keys, nesting bounded by the codec's ``MAX_DEPTH``). Defaults are shown as ``= value``;
    a field without one is required.

Reports
    A node tells a client about a run by calling the client's own endpoint: ``REQUEST`` with
    method ``exit`` or ``failed`` to the client's address. The client answers each with an empty
    successful ``REPLY`` (so the node knows it arrived; an unanswered report is logged and dropped
    after ``REPORT_TIMEOUT_S``). A client ignores reports of pipelines it does not know. The
    ``progress`` report is one-way: the client does not answer it, and a lost one is replaced by
    the next.

Versioning
    ``PIPELINE_PROTOCOL`` (2) is this conversation's version, apart from the bus's
    ``PROTOCOL_VERSION``. ``run`` and ``negotiate`` carry ``protocol``; a node that speaks another
    version answers ``protocol`` (and ``info`` says which version a node speaks). Version 1 was
    the same conversation before it was written down: error replies had no ``code``, ``exit``
    had no ``cancelled`` and said cancellation only in ``error``'s text. ``negotiate.caller`` and
    the ``unauthorized`` code came later within version 2, compatibly: a node that does not know
    ``caller`` ignores it (and has no keys to check it against), and a caller that does not know
    a code treats it as a failure like any other. So did ``run.direct_read``, ``claim`` and the
    ``read_*``/``stdout_token`` fields: a node that does not know ``direct_read`` ignores it and
    offers no ``read_token``, and a client that does not ask gets none.

Methods (``REQUEST`` to ``<node>/ctl``)
    ``run`` (client -> its entry node): run a pipeline. Body:
        ``pipeline: str`` (the pipeline text, at most ``MAX_PIPELINE_CHARS``: stages separated by
        ``|``, each ``PROG[@NODE] ARGS...`` in shell words), ``protocol: int``,
        ``mode: str = "bytes"`` (``bytes``, ``json`` or ``yaml``: what flows between stages),
        ``stdin: bool = false`` (the client streams data into the first stage),
        ``require: list[str] = []`` (version constraints such as ``"sort>=9"``),
        ``user: str = ""`` (who asks, as the client says), ``pipes: map = {}`` (Dagster Pipes
        options, :mod:`dpipes.nodes.pipes_options`), ``local_fds: str = ""`` (a token under which
        a client on the node's host handed its stdin/stdout over, :mod:`dpipes.nodes.fdpass`),
        ``cwd: str = ""`` (the client's working directory, absolute), ``workdir: str = ""`` (where
        every stage starts, as the user chose it: ``--cwd``; see *Working directories*),
        ``progress: bool = false`` (send ``progress`` reports to the client while the run goes),
        ``workflow: map = {}`` (a workflow document, :mod:`dpipes.nodes.workflow`: named stages
        and connections between their anchors; when given, it is what runs and ``pipeline`` only
        names it), ``edge_format: str = "csv"`` (``csv``, ``ndjson`` or ``arrow``: what a
        program's bytes are at an edge with a plugin stage, in bytes mode; in an object mode the
        objects themselves), ``direct_read: bool = false`` (the client can read the last stage's
        output at that stage's node: see *Direct read*). The entry node parses the text, places
        every stage, negotiates with every chosen node,
        then starts every stage, the last one first. Nothing starts unless every node agreed.
        Reply: ``pipeline: str`` (the run's id), ``stdin_direct: bool = false`` and
        ``stdout_direct: bool = false`` (the handed-over stdin/stdout went straight to the
        first/last stage: the client neither feeds nor reads them), ``stages: list[map]``, each
        ``index: int, node: str, argv: list[str], addr: str, context: map`` (``addr`` is the
        stage address, ``context`` the Pipes context it was started with), ``placed: str = ""``
        (why it went to ``node``: ``pinned``; ``offered``, by that node as ``offer: str = ""``;
        ``local``, nobody offers it and the entry node has it); ``read_token: str = ""`` (at most
        ``MAX_TOKEN_CHARS``; not empty: the last stage holds its stdout until the client claims
        it with this token, *Direct read*), ``read_endpoint: str = ""`` (the ``tcp://`` bus
        endpoint of the last stage's node) and ``read_key: str = ""`` (the public key, Z85, that
        node authenticated with at the entry node; ``""``: a node without keys).
    ``cancel`` (client -> its entry node, or coordinator -> each node): stop a run.
        Body: ``pipeline: str``, ``reason: str = "cancelled"``. From the client that started it,
        the entry node cancels the run on every node; otherwise the node terminates its own
        stages of the run that the caller negotiated (TERM to the process group, KILL after a
        grace; a caller that negotiated none stops nothing). Reply:
        ``stages: int = 0`` (how many stages of it were here). Every stage still reports ``exit``.
    ``info`` (anyone -> a node): what the node knows. Body: empty. Reply: ``node: str``,
    ``protocol: int``, ``nodes: list[map]``, each ``name: str, endpoint: str, programs: list[str]``
    (its offers: program names, or a program with fixed arguments in shell words, ``sort -r``),
    source: str`` (``self``, ``static``, ``mdns``, ``gossip``, ``linked``), ``last_seen_s: float``,
    ``up: bool``, ``plugin_versions: map[str, str] = {}`` (plugin name -> the version of the
    distribution providing it, for this node and the nodes linked to it; ``programs`` lists each
    plugin as ``%NAME``), ``tap: str = ""`` (the node's TCP tap endpoint, for ``dpipes-tap`` on
    other hosts: this node's own, or what a linked node said in its ``HELLO``/``WELCOME``;
    ``""`` when it has none or is not linked).
    ``negotiate`` (coordinator -> each chosen node): may this stage run here? Body:
        ``pipeline: str, stage: int, argv: list[str]`` (at least one word), ``protocol: int``,
        ``mode: str = "bytes"``, ``require: list[str] = []``, ``user: str = ""``,
        ``peers: map[str, str] = {}`` (node name -> bus endpoint of the neighbouring stages'
        nodes, which this node links to before it agrees), ``pinned: bool = false`` (the user
        pinned the stage to this node: ``PROG@NODE``), ``config: map = {}`` (a plugin stage's
        configuration, over its ``KEY=VALUE`` words), ``caller: str = ""`` (on whose behalf a
        coordinator asks: see *Who asks*). The node checks the version, the mode, that the caller
        may run the stage here (``unauthorized``), that the program is allowed and found here and
        meets ``require`` (a node that offers a
        program with fixed arguments, ``sort -r``, refuses a stage that does not start with them
        unless it is pinned), then reserves the stage address. Reply: ``addr: str``,
        ``host: str = ""`` (the node's host identity: its host name and machine id; nodes that
        answer the same run on one host). A *plugin stage* has ``argv[0]`` = ``%NAME``: the node
        checks that the plugin is allowed (``%NAME`` in an allow list) and installed (an entry
        point ``NAME`` in the group ``dpipes.plugins``; else ``refused``), and reserves the stage
        address for the worker process it will start.
    ``start`` (coordinator -> each node, after every ``negotiate`` succeeded): start a negotiated
        stage. Body: ``pipeline: str, stage: int``, ``stdin_from: str = ""`` (who streams the
        stage's stdin: the previous stage's address or the client's; ``""``: no input, stdin is
        closed at once), ``stdout_to: str`` (where its stdout goes: the next stage's address or
        the client's), ``stderr_to: str`` (where its stderr and Pipes messages go: the client),
        ``report_to: list[str]`` (who gets its ``exit`` report), ``user: str = ""``,
        ``pipes: map = {}`` (this stage's Pipes options), ``direct_in: bool = false`` /
        ``direct_out: bool = false`` (the neighbour is on this node too, or the client handed its
        stdin/stdout over: that edge is one kernel pipe and carries nothing on the bus; for a
        plugin stage, set only in a linear pipeline, its worker gets its end of the pipe in place
        of its one input connection's or output destination's stream, see
        ``dpipes.nodes.plugins.spec``),
        ``cwd: str = ""`` (the directory the stage starts in; a relative one is taken from the
        node's configured ``workdir``; ``""``: that ``workdir`` itself), ``progress_to: str = ""``
        (where to send the stage's ``progress`` reports; ``""``: none),
        ``inputs: list[map] = []`` and ``outputs: list[map] = []`` (a plugin stage's edges, in
        place of ``stdin_from`` and ``stdout_to``), ``stdout_token: str = ""`` (at most
        ``MAX_TOKEN_CHARS``; not empty: hold the stdout, reading none of it, until a ``claim``
        with this token says where it goes, in place of ``stdout_to``; *Direct read*). Each input
        is one connection into an input anchor: ``anchor: str, connection: str`` (``#1``,
        ``#2``, ... per anchor), ``src: str = ""``
        (the sending stage's address or the client's; ``""``: an optional input anchor nothing
        feeds, which the plugin sees complete without data), ``src_anchor: str = ""`` (the sending
        plugin's output anchor: its stream's first ``ARROW`` part carries it under ``anchor``),
        ``format: str`` (``batches``: ``ARROW`` messages from a plugin; ``csv``, ``ndjson``,
        ``arrow``: a program's bytes in that format, or ``OBJECTS`` in an object mode). Each
        output is one destination of an output anchor: ``anchor: str``, ``dst: str = ""`` (an
        address; ``""``: a declared anchor whose data is discarded), ``dst_anchor: str = ""``,
        ``format: str`` (as for inputs). The worker sends ``ARROW`` to a plugin, else the format
        as ``BYTES`` (``OBJECTS`` in an object mode), and its ``io`` messages as ``PIPES`` to
        ``stderr_to``. Reply: ``pid: int, context: map``.
    ``claim`` (client -> the node of a stage started with ``stdout_token``): send that stage's
        stdout to me. Body: ``pipeline: str, stage: int, token: str`` (the run reply's
        ``read_token``). Taken once, from the first caller with the right token who is the stage's
        caller (the key it was negotiated for, *Who asks*), the party that negotiated it (the
        entry node, through which a client that cannot reach the node claims), or the node's own
        user over its ``ipc://`` socket: the stdout stream then opens to the request's ``src``.
        A wrong token, or another caller: ``unauthorized``; no such stage here, its output not
        held, or claimed already: ``not-found``. Reply: empty.
    ``gossip`` (node -> each linked node, every ``GOSSIP_INTERVAL_S`` and on a new link): the
        nodes the sender knows. Body: ``peers: map[str, str]`` (node name -> ``tcp://`` bus
        endpoint), ``keys: map[str, str] = {}`` (node name -> its public key, 40 characters of
        Z85, for the peers whose key the sender knows; never anything secret; the receiver links a
        peer only if its known_nodes trusts that key). One-way: the sender does not wait for the
        reply (empty).

Reports (``REQUEST`` to a client's or coordinator's address; reply: empty)
    ``exit``: a stage ended. Body: ``pipeline: str, stage: int, node: str``, ``code: int`` (its
    exit code, -1 when it was killed by a signal), ``signal: int = 0``, ``status: str`` (for a
    person: "exit 0", "killed by SIGTERM"), ``sigpipe: bool = false`` (it was stopped because its
    reader finished early, as SIGPIPE: a shell leaves such a stage out of ``pipefail``),
    ``error: str = ""`` (its data could not be moved: the output is not complete),
    ``cancelled: str = ""`` (why it was cancelled, when it was; not an error of its own),
    ``stderr_tail: str = ""`` (the end of a failed stage's stderr), ``started: float = 0.0`` and
    ``ended: float = 0.0`` (when its program started and exited: wall-clock seconds since the
    Unix epoch, on the node's clock; 0: unknown), ``bytes_in: int = -1`` and
    ``bytes_out: int = -1`` (bytes of data this node wrote to the program's stdin and read from
    its stdout; -1 when the node did not see them: an edge that is one kernel pipe, ``direct_in``
    / ``direct_out``, passes by the node).
    ``progress`` (one-way, from the node's ``ctl`` to ``start.progress_to``): a running stage's
    counters. Body: ``pipeline: str, stage: int, node: str, bytes_in: int, bytes_out: int`` (as
    in ``exit``: so far, -1 for an edge the node does not see). Sent at most every
    ``PROGRESS_INTERVAL_S`` per stage and only when a counter changed; the ``exit`` report has
    the final counts.
    ``failed``: the run failed as a whole (a node was lost, ...). Body: ``pipeline: str,
    error: str, lost: list[int] = []`` (the stages that ran on a lost node: whichever of them
    has not reported to the client never will; one that has keeps its own report).

Who asks
    A node with keys knows who sends each request from its transport, never from a body: the key
    a TCP peer authenticated with (CurveZMQ), or the uid of an ``ipc://`` peer (the daemon's own
    user only). ``user`` fields are what a client says of itself and decide nothing. A ``run``
    is the client's: its entry node negotiates every stage on the client's behalf and names the
    client in ``negotiate.caller``: the client's key fingerprint (``SHA256:...``) when it came by
    CURVE; for the entry node's own local user, that user's client key (``client.key`` in the
    node's key directory), which the other nodes authorize like any client key (its own node
    also takes ``uid:UID`` there); ``""`` on a node without keys. A node takes ``caller`` only
    from a known peer node, or from its own coordinator; from anyone else a ``caller`` is
    refused (``unauthorized``). Without ``caller`` the sender itself is the caller: a peer
    node's own key may run nothing. The node's policy (``authorized_keys``) then decides for
    that caller and the stage's ``argv``; a refusal is ``unauthorized``, naming the key, the
    program or argument and the rule, before any stage of the run starts. ``start`` is taken
    only from the party that negotiated the stage (else ``unauthorized``).

Working directories
    A stage on the client's own host starts in the client's working directory (``run.cwd``), as
    in a shell; a stage on another host starts in its node's ``workdir`` (configured; by default
    the home directory of the node's user, as ssh does). The entry node decides which stages are
    on the client's host: a client attached to it over its ``ipc://`` path is on its host (only
    a process of that host can reach a Unix socket; what a TCP client says of itself is not
    taken), and a node is on that host when its ``negotiate`` reply's ``host`` equals the entry
    node's own. The entry node sends ``start.cwd`` accordingly: ``run.cwd`` to those stages,
    ``""`` to the others. ``run.workdir`` (``--cwd DIR``) overrides this for every stage: an
    absolute one is used as it is, a relative one from each stage's place above. A directory
    that does not exist on a node fails the run's start, naming the node and the directory.

A run, from the client's side
    1. Attach to the entry node; call ``run``. On failure the error names the stage, node and
       reason; nothing started.
    2. Data. With ``stdin`` and not ``stdin_direct``: open a stream (codec: *Flow control*) from
       the client's address to ``stages[0].addr`` and send the input as ``BYTES`` (``OBJECTS`` in
       an object mode), then ``EOF``. Each stage opens streams *to the client*: from the last
       stage's address, its stdout (``BYTES``/``OBJECTS``; unless ``stdout_direct``; with a
       ``read_token``, only once claimed, and to where it was claimed: *Direct read*); from every
       stage's address, its stderr (``STDERR``, opened only when it writes any) and its Pipes
       messages (``PIPES``, opened at the first). Streams from one stage address are told apart
       by their ``sid`` and by the kind of their data messages. The client grants credit on each
       as it consumes; it may ``CANCEL`` the stdout stream to stop the pipeline early (as a
       reader that exits closes a pipe).
       Every one of these streams, ``STDERR`` and ``PIPES`` included, is under credit, and its
       ``EOF`` waits for the client's ``EOF_ACK``.
    3. Each stage reports ``exit`` once its streams to the client were acknowledged (so a client
       that never answers ``EOF`` delays the reports); a ``failed`` report ends the run and lists
       the stages that will not report. Stages start before ``run`` is answered, the last one
       first, so a stage's streams and even its ``exit`` may reach the client before the ``run``
       reply: a client keeps reports of a pipeline id it does not know yet until that reply. The
       run is over when every stage reported or was listed ``lost``. A run started with
       ``progress`` also gets one-way ``progress`` reports meanwhile (not answered; a client may
       ignore them).
    4. To stop a run (Ctrl-C): ``cancel`` to the entry node with the pipeline id. Stopped before
       the ``run`` reply came, a client has no id yet: it cancels as soon as the reply arrives
       (if it leaves instead, the entry node cancels the run of a client that went away).

Direct read
    When the last stage runs on another node than the entry node, its stdout would cross the
    entry node's hub on its way to the client. A client that asks (``run.direct_read``) may read it
    where it is made: for a linear pipeline whose last stage is a program on a node linked to the
    entry node at a ``tcp://`` address, the entry node draws a random token, starts the last stage
    with ``start.stdout_token`` and answers ``read_token``, ``read_endpoint`` and ``read_key``.
    The stage reads nothing of its program's stdout until a ``claim`` is taken (its pipe fills
    and the program waits, as behind a slow reader). The client attaches to that node (codec:
    ``ATTACH``): at its Unix socket when a daemon of the client's user by that name runs on the
    client's host (``<runtime dir>/<node>.sock``), else at ``read_endpoint`` (with CURVE and its
    own client key when ``read_key`` is set, as any remote client: the node must admit that key),
    and sends ``claim`` to ``<node>/ctl`` there; the stdout stream then comes to that attachment,
    over one network hop (or none). Should the attachment or the claim
    fail (nothing answers within ``DIRECT_ATTACH_TIMEOUT_S``, the node refuses the key, or the
    claim from it), the client sends the same ``claim`` through its entry node, and the stream
    comes that way, as without a direct read. The switch is decided before any byte flows, by
    the one claim the node takes: nothing is lost or doubled. The stage's stderr, Pipes messages
    and ``exit`` report still go to the client's entry address. A held stdout nobody claims
    within ``CLAIM_TIMEOUT_S`` fails the stage (its ``exit`` has an ``error``).

Errors (``REPLY.body.code``)
    ``bad-request``: the body is malformed (``field`` names what). ``unknown-method``.
    ``protocol``: the caller speaks another ``PIPELINE_PROTOCOL``. ``syntax``: the pipeline text
    does not parse. ``refused``: a node will not run a stage (not allowed, not found, version);
    the error names stage, node, program and reason. ``placement``: no node offers a stage's
    program, or a pinned node is not known. ``limit``: a configured limit (stages per pipeline).
    ``not-found``: no such pipeline or negotiated stage here. ``unreachable``: a node could not
    be reached. ``unauthorized``: the caller may not do this here (*Who asks*); the error names
    the caller and what was refused. ``internal``: a bug in the node; the error says where.

Limits and timeouts
    ======================  ========  ===========================================================
    constant                value     what it bounds
    ======================  ========  ===========================================================
    ``MAX_TEXT_CHARS``      4096      a ``str`` field unless noted (names, addresses, arguments)
    ``MAX_PIPELINE_CHARS``  60000     ``run.pipeline``
    ``MAX_ITEMS``           1024      a list's items, a map's entries; ``stage`` numbers
    ``CONTROL_TIMEOUT_S``   10.0 s    ``negotiate``, ``start`` and ``cancel`` between nodes
    ``RUN_TIMEOUT_S``       60.0 s    ``run`` as the client waits (version probes included)
    ``REPORT_TIMEOUT_S``    5.0 s     a report's acknowledgement
    ``GOSSIP_INTERVAL_S``   2.0 s     between two ``gossip`` calls to one peer
    ``PROGRESS_INTERVAL_S`` 0.5 s     at least this between two ``progress`` reports of a stage
    ``MAX_TOKEN_CHARS``     64        ``claim.token``, ``run.read_token``, ``start.stdout_token``
    ``CLAIM_TIMEOUT_S``     30.0 s    a held stdout waits this long for its ``claim``
    ======================  ========  ===========================================================

    A client gives up attaching to ``read_endpoint`` after ``DIRECT_ATTACH_TIMEOUT_S`` (3 s,
    :mod:`dpipes.nodes.direct_read`) and claims through its entry node.

    ``stderr_tail`` and ``failed.error`` may hold 4 x ``MAX_TEXT_CHARS``. A node also refuses
    pipelines of more stages than its configured ``[limits] max_stages`` (``limit``).
"""

# Longer than ~500 lines on purpose: a third is the spec above, and the rest is one table of body
# classes with the one validator and schema generator they share.

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import socket
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeAlias

from dpipes.bus.codec import MAX_DEPTH
from dpipes.bus.errors import DpipesError

CTL = "ctl"
"""The name of every node's control endpoint: ``<node>/ctl``."""

PIPELINE_PROTOCOL = 2
"""Version of this conversation; bumped by hand when it changes incompatibly."""

MODES = ("bytes", "json", "yaml")
EDGE_FORMATS = ("csv", "ndjson", "arrow")  # a program's bytes at an edge with a plugin (dpipes.nodes.plugins.edges)
PLUGIN_EDGE_FORMATS = ("batches", *EDGE_FORMATS)  # what one plugin edge carries: ARROW messages, or a program's bytes

MAX_TEXT_CHARS = 4096  # a name, address, reason or argument
MAX_PIPELINE_CHARS = 60_000  # a whole pipeline's text (the header that carries it is 64 KiB at most)
MAX_ITEMS = 1024  # items of one list (argv words, stages, nodes)
MAX_TOKEN_CHARS = 64  # a claim token (``claim``): 24 random bytes as URL-safe base64 are 32

CONTROL_TIMEOUT_S = 10.0  # negotiate/start/cancel answers between nodes; they involve no data
RUN_TIMEOUT_S = 60.0  # a client's wait for `run`: negotiation and start across every node
REPORT_TIMEOUT_S = 5.0  # an exit/failed report nobody acknowledges is logged and dropped after this
GOSSIP_INTERVAL_S = 2.0  # how often a node tells its peers the nodes it knows (also at once on a new link)
PROGRESS_INTERVAL_S = 0.5  # a person sees movement; a client on a slow link is not flooded
CLAIM_TIMEOUT_S = 30.0  # a held stdout nobody claimed: the client is gone or broken, the stage fails

# Error codes (REPLY.body.code)
BAD_REQUEST = "bad-request"
UNKNOWN_METHOD = "unknown-method"
PROTOCOL = "protocol"
SYNTAX = "syntax"
REFUSED = "refused"
PLACEMENT = "placement"
LIMIT = "limit"
NOT_FOUND = "not-found"
UNREACHABLE = "unreachable"
UNAUTHORIZED = "unauthorized"
INTERNAL = "internal"
CODES = (
    BAD_REQUEST,
    UNKNOWN_METHOD,
    PROTOCOL,
    SYNTAX,
    REFUSED,
    PLACEMENT,
    LIMIT,
    NOT_FOUND,
    UNREACHABLE,
    UNAUTHORIZED,
    INTERNAL,
)


class ControlError(DpipesError):
    """A control call failed with a coded reason; ``str()`` is the sentence for a person.

    Raised by a handler, it becomes the failed REPLY; raised by :func:`call`, it is that REPLY.
    """

    def __init__(self, code: str, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.code = code if code in CODES else INTERNAL
        self.field = field

    def body(self) -> dict[str, str]:
        """The failed REPLY's body."""
        return {"code": self.code, "field": self.field}


class BadRequest(ControlError, ValueError):
    """A body field is missing, of the wrong type, or out of bounds; ``field`` names it."""

    def __init__(self, field: str, problem: str, *, what: str = "request") -> None:
        super().__init__(BAD_REQUEST, f"malformed {what}: field {field!r} {problem}", field=field)


# -- typed bodies --------------------------------------------------------------------------------

_MISSING = dataclasses.MISSING


def _bounds(
    *,
    max_chars: int = MAX_TEXT_CHARS,
    choices: tuple[str, ...] = (),
    min: int | None = None,
    max: int | None = None,
    non_empty: bool = False,
) -> dict[str, Any]:
    return {"max_chars": max_chars, "choices": choices, "min": min, "max": max, "non_empty": non_empty}


def bounded(default: Any = _MISSING, **bounds: Any) -> Any:
    """A body field with bounds (``max_chars``, ``choices``, ``min``, ``max``, ``non_empty``)."""
    meta = {"bounds": _bounds(**bounds)}
    if isinstance(default, (list, dict, tuple)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Body:
    """A request, reply or report body; one subclass each, checked by :func:`parse`."""

    METHOD: ClassVar[str] = ""
    _FIELDS: ClassVar[tuple[tuple[str, Any, Any, dict[str, Any]], ...]] = ()

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self.to_body() == other.to_body()

    def __hash__(self) -> int:
        return hash((self.__class__, repr(self)))

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{self.__class__.__qualname__}({fields})"

    def to_body(self) -> dict[str, Any]:
        """The msgpack map that goes on the wire."""
        return {name: _plain(getattr(self, name)) for name, _t, _d, _b in self._fields()}

    @classmethod
    def _fields(cls) -> tuple[tuple[str, Any, Any, dict[str, Any]], ...]:
        if "_FIELDS" not in cls.__dict__:  # once per class, a body with no fields too (every run has some)
            hints = typing.get_type_hints(cls)
            spec = []
            for f in dataclasses.fields(cls):
                default = (
                    f.default
                    if f.default is not _MISSING
                    else (f.default_factory if f.default_factory is not _MISSING else _MISSING)
                )
                spec.append((f.name, hints[f.name], default, f.metadata.get("bounds") or _bounds()))
            cls._FIELDS = tuple(spec)
        return cls._FIELDS

    @classmethod
    def parse(cls, body: Any, *, what: str = "", prefix: str = "") -> Any:
        """Check ``body`` (off the wire) and build the typed body.

        Raises:
            BadRequest: naming the first field at fault.
        """
        what = what or (f"{cls.METHOD} body" if cls.METHOD else "body")
        if type(body) is not dict:
            raise BadRequest(prefix.rstrip(".") or "body", f"must be a map, got {type(body).__name__}", what=what)
        values = {}
        for name, hint, default, bounds in cls._fields():
            path = prefix + name
            if name not in body:
                if default is _MISSING:
                    raise BadRequest(path, "is missing", what=what)
                values[name] = default() if callable(default) else default
                continue
            values[name] = _check(body[name], hint, bounds, path, what)
        return cls(**values)


def _plain(value: Any) -> Any:
    if isinstance(value, Body):
        return value.to_body()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _check(value: Any, hint: Any, bounds: dict[str, Any], path: str, what: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is str:
        if type(value) is not str:
            raise BadRequest(path, f"must be a string, got {type(value).__name__}", what=what)
        if len(value) > bounds["max_chars"]:
            raise BadRequest(path, f"is {len(value)} characters long (limit {bounds['max_chars']})", what=what)
        if bounds["choices"] and value not in bounds["choices"]:
            raise BadRequest(path, f"must be one of {', '.join(bounds['choices'])}, got {value!r:.40}", what=what)
        if bounds["non_empty"] and not value:
            raise BadRequest(path, "must not be empty", what=what)
        return value
    if hint is bool:
        if type(value) is not bool:
            raise BadRequest(path, f"must be a boolean, got {type(value).__name__}", what=what)
        return value
    if hint is int:
        if type(value) is not int:
            raise BadRequest(path, f"must be an integer, got {type(value).__name__}", what=what)
        low, high = bounds["min"], bounds["max"]
        if (low is not None and value < low) or (high is not None and value > high) or abs(value) >= 2**63:
            raise BadRequest(path, f"is out of range: {value!r:.40}", what=what)
        return value
    if hint is float:
        if type(value) not in (float, int):
            raise BadRequest(path, f"must be a number, got {type(value).__name__}", what=what)
        return float(value)
    if origin is tuple:  # tuple[T, ...]: a list on the wire
        if type(value) is not list:
            raise BadRequest(path, f"must be a list, got {type(value).__name__}", what=what)
        if len(value) > MAX_ITEMS:
            raise BadRequest(path, f"has {len(value)} items (limit {MAX_ITEMS})", what=what)
        if bounds["non_empty"] and not value:
            raise BadRequest(path, "must not be empty", what=what)
        item = typing.get_args(hint)[0]
        item_bounds = {**bounds, "non_empty": False}
        return tuple(_check(v, item, item_bounds, f"{path}.{i}", what) for i, v in enumerate(value))
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if type(value) is not dict:
            raise BadRequest(path, f"must be a map, got {type(value).__name__}", what=what)
        if len(value) > MAX_ITEMS:
            raise BadRequest(path, f"has {len(value)} entries (limit {MAX_ITEMS})", what=what)
        if value_type is Any:
            _check_json(value, path, what)
            return value
        out = {}
        for k, v in value.items():
            key = _check(k, key_type, _bounds(), f"{path}.<key>", what)
            out[key] = _check(v, value_type, _bounds(), f"{path}.{k!s:.40}", what)
        return out
    if isinstance(hint, type) and issubclass(hint, Body):
        return hint.parse(value, what=what, prefix=path + ".")
    raise AssertionError(f"no checker for {hint!r}")  # a body class this module declares wrongly


def _check_json(value: dict[str, Any], path: str, what: str) -> None:
    """A free-form map: string keys at every level, nesting within the codec's MAX_DEPTH."""
    todo: list[tuple[Any, int]] = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise BadRequest(path, f"nests deeper than {MAX_DEPTH} levels", what=what)
        if isinstance(item, dict):
            if any(type(k) is not str for k in item):
                raise BadRequest(path, "must have string keys only", what=what)
            todo.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            todo.extend((v, depth + 1) for v in item)


Json: TypeAlias = dict[str, Any]

BODIES: dict[tuple[str, str], type[Body]] = {}  # (method, "request" | "reply") -> body class


def _body(method: str, role: str) -> Callable[[type[Body]], type[Body]]:
    def register(cls: type[Body]) -> type[Body]:
        cls.METHOD = method
        BODIES[(method, role)] = cls
        return cls

    return register


# One __eq__ and __repr__ for every body (Body's), rather than ones ``dataclasses`` generates and
# compiles per class: as in the codec, that halves what importing this module costs `dpipes`.
_B = typing.TypeVar("_B", bound=type)

if typing.TYPE_CHECKING:  # mypy sees through a decorator alias only when told it makes dataclasses

    @typing.dataclass_transform(kw_only_default=True, frozen_default=True, eq_default=False)
    def _slot(cls: _B) -> _B: ...

else:
    _slot = dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)


@_body("run", "request")
@_slot
class RunRequest(Body):
    """Run a pipeline (client -> entry node)."""

    pipeline: str = bounded(max_chars=MAX_PIPELINE_CHARS, non_empty=True)
    protocol: int
    mode: str = bounded("bytes", choices=MODES)
    stdin: bool = False
    require: tuple[str, ...] = ()
    user: str = ""
    pipes: Json = dataclasses.field(default_factory=dict)
    local_fds: str = ""
    cwd: str = ""
    workdir: str = ""
    progress: bool = False
    workflow: Json = dataclasses.field(default_factory=dict)
    edge_format: str = bounded("csv", choices=EDGE_FORMATS)
    direct_read: bool = False


@_slot
class StageInfo(Body):
    """One started stage, in the reply to ``run``."""

    index: int = bounded(min=0)
    node: str
    argv: tuple[str, ...]
    addr: str
    context: Json = dataclasses.field(default_factory=dict)
    placed: str = bounded("", choices=("", "pinned", "offered", "local"))
    offer: str = ""


@_body("run", "reply")
@_slot
class RunReply(Body):
    """The started run: its id and stages."""

    pipeline: str
    stdin_direct: bool = False
    stdout_direct: bool = False
    stages: tuple[StageInfo, ...]
    read_endpoint: str = ""
    read_key: str = ""
    read_token: str = bounded("", max_chars=MAX_TOKEN_CHARS)


@_body("cancel", "request")
@_slot
class CancelRequest(Body):
    """Stop a run."""

    pipeline: str
    reason: str = "cancelled"


@_body("cancel", "reply")
@_slot
class CancelReply(Body):
    """How many stages of the run were on the node."""

    stages: int = bounded(0, min=0)


@_body("info", "request")
@_slot
class InfoRequest(Body):
    """What does the node know (no fields)."""


@_slot
class NodeEntry(Body):
    """One node, as another node knows it."""

    name: str
    endpoint: str
    programs: tuple[str, ...] = ()
    source: str = ""
    last_seen_s: float = 0.0
    up: bool = True
    plugin_versions: dict[str, str] = dataclasses.field(default_factory=dict)
    tap: str = ""


@_body("info", "reply")
@_slot
class InfoReply(Body):
    """The node's name, protocol and the nodes it knows (itself first)."""

    node: str
    protocol: int = PIPELINE_PROTOCOL
    nodes: tuple[NodeEntry, ...] = ()


@_body("negotiate", "request")
@_slot
class NegotiateRequest(Body):
    """May this stage run here? (coordinator -> node)."""

    pipeline: str = bounded(non_empty=True)
    stage: int = bounded(min=0, max=MAX_ITEMS)
    argv: tuple[str, ...] = bounded(non_empty=True)
    protocol: int
    mode: str = bounded("bytes", choices=MODES)
    require: tuple[str, ...] = ()
    user: str = ""
    peers: dict[str, str] = dataclasses.field(default_factory=dict)
    pinned: bool = False
    config: Json = dataclasses.field(default_factory=dict)
    caller: str = ""


@_body("negotiate", "reply")
@_slot
class NegotiateReply(Body):
    """The reserved stage address, and the node's host identity."""

    addr: str
    host: str = ""


@_slot
class PluginInput(Body):
    """One connection into a plugin stage's input anchor."""

    anchor: str = bounded(non_empty=True)
    connection: str = bounded(non_empty=True)
    src: str = ""  # "": an optional anchor left unconnected
    src_anchor: str = ""
    format: str = bounded(choices=PLUGIN_EDGE_FORMATS)


@_slot
class PluginOutput(Body):
    """Where one of a plugin stage's output anchors goes (an anchor may go to several places)."""

    anchor: str = bounded(non_empty=True)
    dst: str = ""
    dst_anchor: str = ""
    format: str = bounded(choices=PLUGIN_EDGE_FORMATS)


@_body("start", "request")
@_slot
class StartRequest(Body):
    """Start a negotiated stage (coordinator -> node)."""

    pipeline: str = bounded(non_empty=True)
    stage: int = bounded(min=0, max=MAX_ITEMS)
    stdin_from: str = ""
    stdout_to: str
    stderr_to: str
    report_to: tuple[str, ...] = ()
    user: str = ""
    pipes: Json = dataclasses.field(default_factory=dict)
    direct_in: bool = False
    direct_out: bool = False
    cwd: str = ""
    progress_to: str = ""
    inputs: tuple[PluginInput, ...] = ()
    outputs: tuple[PluginOutput, ...] = ()
    stdout_token: str = bounded("", max_chars=MAX_TOKEN_CHARS)


@_body("start", "reply")
@_slot
class StartReply(Body):
    """The started stage's pid and Pipes context."""

    pid: int = bounded(min=0)
    context: Json = dataclasses.field(default_factory=dict)


@_body("claim", "request")
@_slot
class ClaimRequest(Body):
    """Send a stage's held stdout to the caller (client -> the last stage's node)."""

    pipeline: str = bounded(non_empty=True)
    stage: int = bounded(min=0, max=MAX_ITEMS)
    token: str = bounded(max_chars=MAX_TOKEN_CHARS, non_empty=True)


@_body("gossip", "request")
@_slot
class GossipRequest(Body):
    """The nodes the sender knows: name -> bus endpoint; and name -> public key (Z85), where known."""

    peers: dict[str, str] = dataclasses.field(default_factory=dict)
    keys: dict[str, str] = dataclasses.field(default_factory=dict)


@_body("exit", "request")
@_slot
class ExitReport(Body):
    """A stage ended (node -> client and coordinator)."""

    pipeline: str
    stage: int = bounded(min=0)
    node: str
    code: int = bounded(min=-1, max=255)
    signal: int = bounded(0, min=0, max=128)
    status: str
    sigpipe: bool = False
    error: str = ""
    cancelled: str = ""
    stderr_tail: str = bounded("", max_chars=4 * MAX_TEXT_CHARS)
    started: float = 0.0
    ended: float = 0.0
    bytes_in: int = bounded(-1, min=-1)
    bytes_out: int = bounded(-1, min=-1)


@_body("progress", "request")
@_slot
class ProgressReport(Body):
    """A running stage's counters so far (node -> client, one-way)."""

    pipeline: str
    stage: int = bounded(min=0)
    node: str
    bytes_in: int = bounded(-1, min=-1)
    bytes_out: int = bounded(-1, min=-1)


@_body("failed", "request")
@_slot
class FailedReport(Body):
    """The run failed as a whole (entry node -> client)."""

    pipeline: str
    error: str = bounded(max_chars=4 * MAX_TEXT_CHARS)
    lost: tuple[int, ...] = ()


@_slot
class Empty(Body):
    """An empty body (the reply to ``gossip``, ``exit`` and ``failed``)."""


METHODS = tuple(sorted({method for method, _role in BODIES}))
ONE_WAY = frozenset({"gossip", "progress"})


def parse_request(method: str, body: Any) -> Body:
    """The typed request body of a call to ``method``.

    Raises:
        ControlError: ``unknown-method``, or ``bad-request`` naming the field.
    """
    cls = BODIES.get((method, "request"))
    if cls is None:
        raise ControlError(UNKNOWN_METHOD, f"no method {method!r:.64}; methods: {', '.join(METHODS)}")
    parsed: Body = cls.parse(body)
    return parsed


def parse_reply(method: str, body: Any) -> Body:
    """The typed reply body of a successful call to ``method`` (the empty body where none is declared).

    Raises:
        BadRequest: the reply is malformed (``what`` says "reply").
    """
    cls = BODIES.get((method, "reply"), Empty)
    parsed: Body = cls.parse(body, what=f"{method} reply")
    return parsed


def error_of(method: str, dst: str, message: str, body: Mapping[str, Any]) -> ControlError:
    """The :class:`ControlError` a failed REPLY stands for (a reply without a code is ``internal``)."""
    code = body.get("code") if isinstance(body, Mapping) else None
    field = body.get("field", "") if isinstance(body, Mapping) else ""
    return ControlError(
        code if isinstance(code, str) else INTERNAL, message, field=field if isinstance(field, str) else ""
    )


def control_schema() -> dict[str, Any]:
    """The JSON schema of every body, for implementers in other languages.

    The repository keeps it as ``nodes/control_schema.json``; a test checks that the file equals this.
    """
    defs: dict[str, Any] = {}

    def schema_of(hint: Any, bounds: dict[str, Any]) -> dict[str, Any]:
        origin = typing.get_origin(hint)
        if hint is str:
            out: dict[str, Any] = {"type": "string", "maxLength": bounds["max_chars"]}
            if bounds["choices"]:
                out["enum"] = list(bounds["choices"])
            if bounds["non_empty"]:
                out["minLength"] = 1
            return out
        if hint is bool:
            return {"type": "boolean"}
        if hint is int:
            out = {"type": "integer"}
            if bounds["min"] is not None:
                out["minimum"] = bounds["min"]
            if bounds["max"] is not None:
                out["maximum"] = bounds["max"]
            return out
        if hint is float:
            return {"type": "number"}
        if origin is tuple:
            out = {"type": "array", "maxItems": MAX_ITEMS, "items": schema_of(typing.get_args(hint)[0], _bounds())}
            if bounds["non_empty"]:
                out["minItems"] = 1
            return out
        if origin is dict:
            value_type = typing.get_args(hint)[1]
            out = {"type": "object", "maxProperties": MAX_ITEMS}
            if value_type is not Any:
                out["additionalProperties"] = schema_of(value_type, _bounds())
            return out
        if isinstance(hint, type) and issubclass(hint, Body):
            return {"$ref": f"#/$defs/{define(hint)}"}
        raise AssertionError(hint)

    def define(cls: type[Body]) -> str:
        if cls.__name__ not in defs:
            defs[cls.__name__] = {}  # placeholder against recursion
            props = {name: schema_of(hint, bounds) for name, hint, _d, bounds in cls._fields()}
            required = [name for name, _h, default, _b in cls._fields() if default is _MISSING]
            defs[cls.__name__] = {
                "title": cls.__name__,
                "description": (cls.__doc__ or "").strip(),
                "type": "object",
                "properties": props,
                **({"required": required} if required else {}),
            }
        return cls.__name__

    methods: dict[str, dict[str, Any]] = {}
    for (method, role), cls in sorted(BODIES.items()):
        methods.setdefault(method, {})[role] = {"$ref": f"#/$defs/{define(cls)}"}
    define(Empty)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "dpipes-control",
        "title": f"dpipes control protocol bodies, version {PIPELINE_PROTOCOL}",
        "description": "REQUEST/REPLY bodies on <node>/ctl and reports to clients. See dpipes.nodes.protocol.",
        "x-error-codes": list(CODES),
        "x-methods": methods,
        "$defs": defs,
    }


def schema_text() -> str:
    """``control_schema()`` as the text of ``nodes/control_schema.json``."""
    return json.dumps(control_schema(), indent=2, sort_keys=True) + "\n"


def host_identity() -> str:
    """This host's identity as ``negotiate`` replies carry it: ``HOSTNAME:MACHINE-ID`` (the boot
    id where there is no machine id), so that containers sharing a kernel are told apart."""
    ident = ""
    for path in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id"):
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                ident = f.read(64).strip()
        except OSError:
            continue
        if ident:
            break
    return f"{socket.gethostname()}:{ident}"[:MAX_TEXT_CHARS]


def current_user() -> str:
    """Who is asking, as this process's user sees it (sent as ``user``; not authenticated)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


__all__ = [
    "BODIES",
    "CODES",
    "CTL",
    "EDGE_FORMATS",
    "METHODS",
    "MODES",
    "PIPELINE_PROTOCOL",
    "PROGRESS_INTERVAL_S",
    "BadRequest",
    "Body",
    "CancelReply",
    "CancelRequest",
    "ClaimRequest",
    "ControlError",
    "Empty",
    "ExitReport",
    "FailedReport",
    "GossipRequest",
    "InfoReply",
    "InfoRequest",
    "NegotiateReply",
    "NegotiateRequest",
    "NodeEntry",
    "PluginInput",
    "PluginOutput",
    "ProgressReport",
    "RunReply",
    "RunRequest",
    "StageInfo",
    "StartReply",
    "StartRequest",
    "control_schema",
    "current_user",
    "host_identity",
    "parse_reply",
    "parse_request",
]


class _Requester(typing.Protocol):
    async def request(
        self, dst: str, method: str, body: dict[str, Any] | None = None, *, timeout: float = ...
    ) -> dict[str, Any]: ...


async def call(ep: _Requester, node: str, request: Body, *, timeout: float = CONTROL_TIMEOUT_S) -> Any:
    """Call ``request.METHOD`` on ``<node>/ctl`` through endpoint ``ep``; the typed reply body.

    Raises:
        ControlError: the node answered with a failed REPLY (its ``code`` and ``field``), or a
            reply that is not of the method's shape (``bad-request``).
        BusError: the call did not reach the node, or got no answer within ``timeout``.
    """
    from dpipes.bus.errors import RequestFailed

    dst = node if "/" in node else f"{node}/{CTL}"
    try:
        body = await ep.request(dst, request.METHOD, request.to_body(), timeout=timeout)
    except RequestFailed as exc:
        raise error_of(request.METHOD, dst, _without_prefix(str(exc)), exc.body) from None
    return parse_reply(request.METHOD, body)


def _without_prefix(message: str) -> str:
    """Drop the transport's "METHOD at ADDR failed: " prefix: the error names its own place."""
    head, sep, rest = message.partition(" failed: ")
    return rest if sep and " at " in head and "\n" not in head else message
