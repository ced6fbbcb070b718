"""Per-request steering for vLLM's OpenAI-compatible server (engine environment).

``steerscope serve`` runs ``vllm serve MODEL --enforce-eager --worker-extension-cls
steerscope_vllm_adapter.SteerExtension --middleware steerscope_vllm_server.SteerMiddleware`` with
``$STEERSCOPE_VECTORS`` (JSON name -> vector file). This ASGI middleware, on ``/v1/completions`` and
``/v1/chat/completions``:

1. reads the body's ``steering`` object: ``{"vector": name | [names], "alpha": x | [x per name],
   "positions": "all" | "prompt" | "generated"}`` or ``{"ablate": name}``;
2. validates it (unknown names, non-finite alphas, bad positions: HTTP 400 with a one-line reason,
   the server keeps running); a raw ``vllm_xargs["steerscope"]`` is validated the same way;
3. rewrites it into ``vllm_xargs["steerscope"]`` (read by the worker extension per request) and a
   ``cache_salt`` per steering configuration, so prefix-cache entries never cross vectors;
4. before the first completion request, hooks the workers once (``collective_rpc("steerscope_install")``).

``app.state.engine_client`` is a vLLM internal (checked version: see ``steerscope_vllm_adapter.SUPPORTED``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
from typing import Any

from steerscope_vllm_adapter import check_version, parse_spec

PATHS = ("/v1/completions", "/v1/chat/completions")


def to_spec(steering: Any) -> dict[str, Any]:
    """The body's ``steering`` object -> the worker's spec dict (ValueError with a reason)."""
    if not isinstance(steering, dict):
        raise ValueError("'steering' must be an object like {\"vector\": \"name\", \"alpha\": 4}")
    unknown = set(steering) - {"vector", "alpha", "positions", "ablate"}
    if unknown:
        raise ValueError(f"unknown steering field(s) {sorted(unknown)}; use vector, alpha, positions, ablate")
    if "ablate" in steering:
        if "vector" in steering:
            raise ValueError("give either 'vector' (with 'alpha') or 'ablate', not both")
        return {"ablate": steering["ablate"]}
    names = steering.get("vector")
    names = [names] if isinstance(names, str) else names
    if not names or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("'steering.vector' must be a vector name or a list of names")
    alpha = steering.get("alpha", 1.0)
    alphas = alpha if isinstance(alpha, list) else [alpha] * len(names)
    if len(alphas) != len(names):
        raise ValueError(f"{len(names)} vector names but {len(alphas)} alphas")
    for a in alphas:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            raise ValueError(f"alpha must be a finite number, got {a!r}")
    return {"vectors": [[n, a] for n, a in zip(names, alphas)], "positions": steering.get("positions", "all")}


class SteerMiddleware:
    """ASGI middleware: validate and translate per-request steering (see the module docstring)."""

    def __init__(self, app: Any) -> None:
        check_version()
        self.app = app
        self.known = set(json.loads(os.environ.get("STEERSCOPE_VECTORS", "{}")))
        self._installed = False
        self._lock = asyncio.Lock()

    def rewrite(self, data: Any) -> dict[str, Any]:
        """Validate and rewrite one request body in place; returns it."""
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
        spec = parse_spec(raw, self.known)
        if spec is None:
            xargs.pop("steerscope", None)
        else:
            norm = {"vectors": [list(p) for p in spec.vectors], "positions": spec.positions, "ablate": spec.ablate}
            text = json.dumps(norm, sort_keys=True)
            xargs["steerscope"] = text
            data["cache_salt"] = "steerscope-" + hashlib.sha256(text.encode()).hexdigest()[:16]
        if xargs:
            data["vllm_xargs"] = xargs
        return data

    async def _install(self, scope: dict[str, Any]) -> None:
        async with self._lock:
            if not self._installed:
                await scope["app"].state.engine_client.collective_rpc("steerscope_install")
                self._installed = True

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in PATHS:
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        try:
            data = self.rewrite(json.loads(body or b"{}"))
        except ValueError as e:  # json.JSONDecodeError is a ValueError too
            await _reject(send, str(e).splitlines()[0])
            return
        await self._install(scope)
        new = json.dumps(data).encode()
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


async def _reject(send: Any, reason: str) -> None:
    body = json.dumps({"error": {"message": reason, "type": "BadRequestError", "code": 400}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
