"""Per-request steering for vLLM's OpenAI-compatible server (engine environment).

``steerscope serve`` runs ``vllm serve MODEL --enforce-eager --worker-extension-cls
steerscope_vllm_adapter.SteerExtension --middleware steerscope_vllm_server.SteerMiddleware`` with
``$STEERSCOPE_VECTORS`` (JSON name -> vector file). This ASGI middleware, on ``/v1/completions`` and
``/v1/chat/completions``:

1. reads the body, at most ``$STEERSCOPE_MAX_BODY_BYTES`` (default 8 MiB; ``steerscope serve
   --max-body-mib``): a larger one gets HTTP 413 before it is buffered whole (chunks are collected in a
   list, so reading stays linear in the body's size);
2. parses it (invalid JSON, or JSON nested deeper than the parser's stack: HTTP 400) and reads its
   ``steering`` object: ``{"vector": name | [names], "alpha": x | [x per name],
   "positions": "all" | "prompt" | "generated", "condition": GATE, "clamp": {"vector": name, "lo": x,
   "hi": x, "positions": ..., "condition": GATE}}`` (GATE: ``ss.Condition.to_dict()`` JSON; condition and
   clamp optional, docs/conditional.md) or ``{"ablate": name}``;
3. validates it (unknown names, non-finite or too-large alphas -- a 400-digit integer, or one whose
   ``alpha * vector`` overflows float32, as ``ss.steering`` refuses it --, bad positions, ablation of a
   zero vector: HTTP 400 with a one-line reason, the server keeps running); a raw
   ``vllm_xargs["steerscope"]`` is validated the same way;
4. rewrites it into ``vllm_xargs["steerscope"]`` (read by the worker extension per request) and sets
   ``cache_salt`` on every request, steered or not: a hash of the steering configuration (none for an
   unsteered one) and of the client's own salt, if it sent one. A client salt can thus still separate
   tenants, but no request can reuse KV computed under another steering configuration;
5. before the first completion request, hooks the workers once (``collective_rpc("steerscope_install")``).

``app.state.engine_client`` is a vLLM internal (checked version: see ``steerscope_vllm_adapter.SUPPORTED``).
The request handling (:func:`read_body`, :func:`parse_body`, :func:`rewrite`) is plain functions,
unit-tested without vLLM (tests/test_vllm_middleware.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import uuid
from typing import Any

from steerscope_vllm_adapter import check_version, finite_alpha, parse_spec

PATHS = ("/v1/completions", "/v1/chat/completions")
MAX_BODY_BYTES = 8 << 20  # default cap of a request body (8 MiB); $STEERSCOPE_MAX_BODY_BYTES overrides it
FLOAT32_MAX = 3.4028234663852886e38  # the engine steers in float32: alpha * |v| beyond this is inf


class RequestError(ValueError):
    """A request refused with an HTTP status (400 unless said otherwise) and a one-line reason."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


def max_body_bytes() -> int:
    """The body cap: ``$STEERSCOPE_MAX_BODY_BYTES`` (a positive integer) or :data:`MAX_BODY_BYTES`."""
    raw = os.environ.get("STEERSCOPE_MAX_BODY_BYTES")
    if not raw:
        return MAX_BODY_BYTES
    if not raw.isdigit() or int(raw) < 1:
        raise RuntimeError(f"STEERSCOPE_MAX_BODY_BYTES must be a positive integer, got {raw!r}")
    return int(raw)


async def read_body(scope: dict[str, Any], receive: Any, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes; :class:`RequestError` 413 as soon as it is known to be
    larger (a Content-Length above the limit, or the chunks read so far). Chunks are joined once."""
    for key, value in scope.get("headers") or []:
        if key.lower() == b"content-length" and value.strip().isdigit() and int(value) > limit:
            raise RequestError(f"request body of {int(value)} bytes is larger than the server's limit of {limit} "
                               "bytes", 413)
    chunks: list[bytes] = []
    size, more = 0, True
    while more:
        msg = await receive()
        if msg.get("type") == "http.disconnect":
            raise RequestError("the client disconnected before sending the whole body")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(f"request body is larger than the server's limit of {limit} bytes", 413)
        chunks.append(chunk)
        more = msg.get("more_body", False)
    return b"".join(chunks)


def parse_body(body: bytes) -> Any:
    """The body's JSON value; :class:`RequestError` for invalid JSON or nesting deeper than the parser's stack."""
    try:
        return json.loads(body or b"{}")
    except RecursionError:
        raise RequestError("request body is nested too deeply to parse") from None
    except ValueError as e:  # json.JSONDecodeError, and bytes that are not UTF-8
        raise RequestError(f"request body is not valid JSON ({str(e).splitlines()[0][:120]})") from None


def cache_salt(config: str | None, client_salt: Any) -> str:
    """The prefix-cache salt of a request: one per (steering configuration, client salt) pair; the
    configuration None (unsteered) gets a salt too, so no client salt can equal a steered one's."""
    key = json.dumps([config, client_salt], sort_keys=True)
    return "steerscope-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def to_spec(steering: Any) -> dict[str, Any]:
    """The body's ``steering`` object -> the worker's spec dict (ValueError with a reason)."""
    if not isinstance(steering, dict):
        raise ValueError("'steering' must be an object like {\"vector\": \"name\", \"alpha\": 4}")
    unknown = set(steering) - {"vector", "alpha", "positions", "ablate", "condition", "clamp"}
    if unknown:
        raise ValueError(f"unknown steering field(s) {sorted(unknown)}; use vector, alpha, positions, ablate, "
                         "condition, clamp")
    if "ablate" in steering:
        if set(steering) & {"vector", "condition", "clamp"}:
            raise ValueError("give either 'vector' (with 'alpha', 'condition', 'clamp') or 'ablate', not both")
        return {"ablate": steering["ablate"]}
    gated = {k: steering[k] for k in ("condition", "clamp") if k in steering}
    if "vector" not in steering and "clamp" in steering:
        if "condition" in steering:
            raise ValueError("'steering.condition' gates 'vector'; a clamp takes its own 'condition' inside 'clamp'")
        return {"clamp": steering["clamp"], "positions": steering.get("positions", "all")}
    names = steering.get("vector")
    names = [names] if isinstance(names, str) else names
    if not names or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("'steering.vector' must be a vector name or a list of names")
    alpha = steering.get("alpha", 1.0)
    alphas = alpha if isinstance(alpha, list) else [alpha] * len(names)
    if len(alphas) != len(names):
        raise ValueError(f"{len(names)} vector names but {len(alphas)} alphas")
    alphas = [finite_alpha(a) for a in alphas]
    return {"vectors": [[n, a] for n, a in zip(names, alphas)], "positions": steering.get("positions", "all"),
            **gated}


def rewrite(data: Any, known: set[str], norms: dict[str, tuple[float, float]] | None = None,
            shapes: dict[str, tuple[list[int], int]] | None = None, compiled: bool = False) -> dict[str, Any]:
    """Validate and rewrite one request body in place (steering -> ``vllm_xargs``, ``cache_salt`` always set).

    Args:
        data: the parsed body.
        known: the registered vector names.
        norms: per name, the (smallest, largest) layer norm of the vector: refuses ablating a zero
            direction and an ``alpha * vector`` that overflows float32 (None: not checked).
        shapes: per name, (layers, width): refuses a condition of another width, or one that reads a layer above
            the vectors it gates (None: not checked here; the worker still refuses it, leaving it unsteered).
        compiled: the server runs the compiled model, which runs one gate of up to 4 conditions (the rest refused).

    Returns:
        ``data``, rewritten. ValueError (one line) for anything refused.
    """
    if not isinstance(data, dict):
        raise ValueError("request body must be a JSON object")
    xargs = data.get("vllm_xargs") or {}
    if not isinstance(xargs, dict):
        raise ValueError("vllm_xargs must be an object")
    raw = xargs.get("steerscope")
    if "steering" in data:
        if raw is not None:
            raise ValueError("give 'steering' or vllm_xargs.steerscope, not both")
        raw = to_spec(data.pop("steering"))
    spec = parse_spec(raw, known)
    text = None
    if spec is None:
        xargs.pop("steerscope", None)
    else:
        check_doses(list(spec.vectors) + [p for _, ps in spec.rules for p in ps], spec.ablate, norms or {})
        if spec.gated:
            if compiled:
                from steerscope_vllm_gates import compiled_refusal
                from steerscope_vllm_plugin import wanted

                why = compiled_refusal(spec, gate_sites=wanted()[2])
                if why:
                    raise ValueError(why)
            check_gated(spec, shapes)
            text = raw if isinstance(raw, str) else json.dumps(raw, sort_keys=True)
        else:
            norm = {"vectors": [list(p) for p in spec.vectors], "positions": spec.positions, "ablate": spec.ablate}
            text = json.dumps(norm, sort_keys=True)
        xargs["steerscope"] = text
    client = data.get("cache_salt")  # a gated request's salt is its own: its gate must read every prompt token
    data["cache_salt"] = cache_salt(text, [client, uuid.uuid4().hex] if spec is not None and spec.gated else client)
    if xargs:
        data["vllm_xargs"] = xargs
    else:
        data.pop("vllm_xargs", None)
    return data


def check_gated(spec: Any, shapes: dict[str, tuple[list[int], int]] | None) -> None:
    """ValueError when a condition does not fit the vectors it gates (width, or a layer above theirs)."""
    if not shapes:
        return
    from steerscope_vllm_gates import check_spec

    widths = {d for _, d in shapes.values()}
    check_spec(spec, {n: dict.fromkeys(layers) for n, (layers, _) in shapes.items()}, 10**9,
               widths.pop() if len(widths) == 1 else -1)


def vector_shapes(named: dict[str, str]) -> dict[str, tuple[list[int], int]]:
    """(layers, width) of each registered vector file."""
    from steerscope_vllm_adapter import read_vector

    out = {}
    for name, path in named.items():
        vec = read_vector(path)
        out[name] = (sorted(vec), int(next(iter(vec.values())).shape[0]))
    return out


def check_doses(vectors: Any, ablate: str | None, norms: dict[str, tuple[float, float]]) -> None:
    """ValueError when ``alpha * vector`` overflows float32 (as ``ss.steering`` refuses it) or the ablated
    direction is zero (ablation divides by its norm)."""
    for name, alpha in vectors:
        top = norms.get(name, (1.0, 1.0))[1]
        if not math.isfinite(abs(alpha) * top) or abs(alpha) * top > FLOAT32_MAX:
            raise ValueError(f"alpha {alpha:g} * vector {name!r} (norm {top:.3g}) overflows float32; use a smaller "
                             "alpha")
    if ablate is not None and norms.get(ablate, (1.0, 1.0))[0] == 0:
        raise ValueError(f"vector {ablate!r} has a zero direction; ablation divides by its norm")


def vector_norms(named: dict[str, str]) -> dict[str, tuple[float, float]]:
    """(smallest, largest) layer norm of each registered vector file."""
    from steerscope_vllm_adapter import read_vector

    out = {}
    for name, path in named.items():
        ns = [float(t.norm()) for t in read_vector(path).values()]
        out[name] = (min(ns), max(ns))
    return out


class SteerMiddleware:
    """ASGI middleware: validate and translate per-request steering (see the module docstring).

    Args:
        app: the wrapped ASGI app.
        vectors: name -> vector file (default: ``$STEERSCOPE_VECTORS``).
        max_body: the body cap in bytes (default: :func:`max_body_bytes`).
        check: check the vLLM version (off only in tests without vLLM).
    """

    def __init__(self, app: Any, vectors: dict[str, str] | None = None, max_body: int | None = None,
                 check: bool = True) -> None:
        if check:
            check_version()
        self.app = app
        named = json.loads(os.environ.get("STEERSCOPE_VECTORS", "{}")) if vectors is None else vectors
        self.known = set(named)
        self.norms = vector_norms(named)
        self.shapes = vector_shapes(named)
        self.max_body = max_body_bytes() if max_body is None else max_body
        self.compiled = bool(os.environ.get("STEERSCOPE_VLLM_GRAPH"))  # set by `steerscope serve --compiled`
        self._installed = False
        self._lock = asyncio.Lock()

    def rewrite(self, data: Any) -> dict[str, Any]:
        """Validate and rewrite one request body in place; returns it (see :func:`rewrite`)."""
        return rewrite(data, self.known, self.norms, self.shapes, self.compiled)

    async def _install(self, scope: dict[str, Any]) -> None:
        async with self._lock:
            if not self._installed:
                await scope["app"].state.engine_client.collective_rpc("steerscope_install")
                self._installed = True

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in PATHS:
            await self.app(scope, receive, send)
            return
        try:
            data = self.rewrite(parse_body(await read_body(scope, receive, self.max_body)))
            new = json.dumps(data).encode()
        except (ValueError, RecursionError) as e:  # RequestError and parse_spec's reasons are ValueErrors
            status = e.status if isinstance(e, RequestError) else 400
            await _reject(send, (str(e).splitlines() or ["bad request"])[0][:300], status)
            return
        await self._install(scope)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = dict(scope, headers=[*headers, (b"content-length", str(len(new)).encode())])
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": new, "more_body": False}
            return dict(await receive())

        await self.app(scope, replay, send)


async def _reject(send: Any, reason: str, status: int = 400) -> None:
    kind = "RequestTooLarge" if status == 413 else "BadRequestError"
    body = json.dumps({"error": {"message": reason, "type": kind, "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
