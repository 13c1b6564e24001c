"""The gateway: an OpenAI-compatible HTTP API over Flywheel's topics, and the live dashboard.

    POST /v1/chat/completions   publish an InferenceRequest; answer with the final response, or
                                stream chunks over SSE (``stream: true``), OpenAI's wire format
    GET  /v1/models             the catalogue's models (and ``auto``: let the router choose)
    POST /v1/feedback           publish Feedback about one of the caller's own responses (by its
                                bare id or the ``chatcmpl-<id>`` above); the gateway fills in the
                                model, model version and adapter version that answered it
    GET  /dashboard             live charts;  GET /api/stats  the numbers behind them
    GET  /healthz               liveness

Who is calling: with ``FLYWHEEL_GATEWAY_API_KEYS`` set, the bearer key names the user (the body's
``user`` field cannot override it) and a user can only give feedback on their own requests.
Without keys the body's ``user`` field (or an ``X-Flywheel-User`` header) names the user, else
``anonymous``; feedback must name the same user as the request it is about.
Admission: 429 with ``Retry-After`` when the gateway holds too many requests in flight or the
router and workers have too many unprocessed records (consumer lag); Kafka holds the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.catalog import CATALOG
from flywheel.client import FlywheelClient, ResponseTimeout, bare_request_id
from flywheel.gateway.api import ChatCompletionRequest, FeedbackRequest, openai_error
from flywheel.gateway.observer import Observer
from flywheel.gateway.stats import ServiceStats
from infra.connect import Services, connect
from infra.settings import Settings
from infra.telemetry import GATEWAY_INFLIGHT, GATEWAY_REQUESTS
from streams import events

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/models", "/v1/feedback", "/api/stats", "/dashboard", "/healthz"})
PAIRWISE_FIELDS = ("request_id_a", "request_id_b", "winner")


class GatewayError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def _api_keys(settings: Settings) -> dict[str, str] | None:
    if settings.gateway_api_keys is None:
        return None
    keys = json.loads(settings.gateway_api_keys.get_secret_value())
    if not isinstance(keys, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in keys.items()):
        raise ValueError("FLYWHEEL_GATEWAY_API_KEYS must be a JSON object of key -> user id")
    return keys


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = _api_keys(settings)
        self.stats = ServiceStats()
        self.services: Services | None = None
        self.client: FlywheelClient | None = None
        self.observer: Observer | None = None
        self._inflight = 0
        self.owners: OrderedDict[str, str] = OrderedDict()  # request id -> user id (bounded)

    async def start(self) -> None:
        self.services = await connect(self.settings, "flywheel-gateway")
        self.client = FlywheelClient(self.services)
        await self.client.start()
        self.observer = Observer(self.services, self.stats)
        await self.observer.start()

    async def stop(self) -> None:
        if self.observer is not None:
            await self.observer.stop()
        if self.client is not None:
            await self.client.close()
        if self.services is not None:
            await self.services.close()

    @property
    def inflight(self) -> int:
        """Requests the gateway is waiting on (mirrored in the ``flywheel_gateway_inflight`` gauge)."""
        return self._inflight

    @inflight.setter
    def inflight(self, value: int) -> None:
        self._inflight = value
        GATEWAY_INFLIGHT.set(value)

    # -- identity and admission ----------------------------------------------------------------
    def user_of(self, request: Request, claimed: str | None) -> str:
        if self.keys is None:
            return claimed or "anonymous"
        header = request.headers.get("authorization", "")
        key = header[7:] if header.lower().startswith("bearer ") else ""
        user = self.keys.get(key)
        if user is None:
            raise GatewayError(401, "invalid or missing API key", "authentication_error")
        return user

    def admit(self) -> None:
        if self.inflight >= self.settings.gateway_max_inflight:
            raise GatewayError(429, f"{self.inflight} requests in flight; retry shortly", "rate_limit_error",
                               headers={"Retry-After": "1"})
        lag = self.observer.lag_total if self.observer else 0
        if lag > self.settings.gateway_max_lag:
            raise GatewayError(429, f"the service is saturated ({lag} requests waiting); retry shortly",
                               "rate_limit_error", headers={"Retry-After": "2"})

    def remember_owner(self, request_id: str, user: str) -> None:
        self.owners[request_id] = user
        while len(self.owners) > 100_000:
            self.owners.popitem(last=False)

    async def owner_of(self, request_id: str) -> str | None:
        if request_id in self.owners:
            return self.owners[request_id]
        assert self.services is not None
        owner: str | None = await self.services.pool.fetchval(
            "SELECT user_id FROM final_responses WHERE request_id = $1", request_id)
        return owner

    # -- requests --------------------------------------------------------------------------------
    def build_request(self, body: ChatCompletionRequest, user: str) -> dict[str, Any]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        size = sum(len(m["content"]) for m in messages)
        if size > self.settings.max_prompt_chars:
            raise GatewayError(400, f"messages hold {size} characters; the limit is "
                                    f"{self.settings.max_prompt_chars}", param="messages")
        if not any(m["role"] == "user" and m["content"].strip() for m in messages):
            raise GatewayError(400, "at least one non-empty user message is required", param="messages")
        max_tokens = body.requested_tokens() or min(256, self.settings.max_tokens_limit)
        if max_tokens > self.settings.max_tokens_limit:
            raise GatewayError(400, f"max_tokens {max_tokens} exceeds the limit "
                                    f"{self.settings.max_tokens_limit}", param="max_tokens")
        hints: list[str] = []
        if body.model != "auto":
            if body.model not in CATALOG:
                raise GatewayError(404, f"model {body.model!r} does not exist; see GET /v1/models",
                                   param="model", kind="invalid_request_error")
            hints = [body.model]
        return events.inference_request(
            user_id=user, tenant_id="default", messages=messages, max_tokens=max_tokens,
            temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stop,  # type: ignore[arg-type]
            budget_usd=body.budget_usd, willingness_to_pay=body.willingness_to_pay, slo_class=body.slo_class,
            deadline_ms=body.deadline_ms, model_hints=hints, stream=body.stream)


def completion_body(final: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{final['request_id']}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": final["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": final["text"]},
                     "finish_reason": "length" if final["finish_reason"] == "length" else "stop"}],
        "usage": {"prompt_tokens": final["prompt_tokens"], "completion_tokens": final["completion_tokens"],
                  "total_tokens": final["prompt_tokens"] + final["completion_tokens"]},
        "flywheel": {"request_id": final["request_id"], "model_version": final["model_version"],
                     "adapter_version": final["adapter_version"], "worker_id": final["worker_id"],
                     "total_ms": final["total_ms"], "cost_usd": final["cost_usd"],
                     "finish_reason": final["finish_reason"]},
    }


def _chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None = None) -> str:
    body = {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


def create_app(settings: Settings) -> FastAPI:
    gateway = Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        app.state.gateway = gateway
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="Flywheel gateway", lifespan=lifespan)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next: Any) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > settings.gateway_max_body_bytes):
            return JSONResponse(openai_error(f"request body over {settings.gateway_max_body_bytes} bytes"),
                                status_code=413)
        return await call_next(request)

    @app.middleware("http")
    async def _count(request: Request, call_next: Any) -> Any:
        endpoint = request.url.path if request.url.path in ENDPOINTS else "other"
        try:
            response = await call_next(request)
        except Exception:
            GATEWAY_REQUESTS.labels(endpoint, "500").inc()
            raise
        GATEWAY_REQUESTS.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(openai_error(exc.message, exc.kind, exc.param), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": [], "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
        return JSONResponse(openai_error(f"{param or 'body'}: {first['msg']}", param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(openai_error(str(exc.detail)), status_code=exc.status_code)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "inflight": gateway.inflight}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        live = {w["model"] for w in gateway.stats.workers.values() if w["healthy"]}
        data = [{"id": "auto", "object": "model", "created": 0, "owned_by": "flywheel", "live": bool(live)}]
        data += [{"id": name, "object": "model", "created": 0, "owned_by": "flywheel", "live": name in live,
                  "price_per_mtok": {"input": spec.price_in_per_mtok, "output": spec.price_out_per_mtok}}
                 for name, spec in CATALOG.items()]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        user = gateway.user_of(request, body.user)
        record = gateway.build_request(body, user)
        gateway.admit()
        gateway.remember_owner(record["request_id"], user)
        assert gateway.client is not None
        client = gateway.client
        timeout = settings.gateway_request_timeout_s
        if not body.stream:
            gateway.inflight += 1
            try:
                pending = await client.publish_request(record)
                final = await asyncio.wait_for(pending.final, timeout)
            except TimeoutError:
                raise GatewayError(504, f"no response within {timeout:.0f}s", "timeout_error") from None
            finally:
                client._pending.pop(record["request_id"], None)
                gateway.inflight -= 1
            return completion_body(final)

        async def sse() -> AsyncIterator[str]:
            gateway.inflight += 1
            rid = record["request_id"]
            sent_role = False
            try:
                async for kind, event in client.stream_events(request=record, timeout_s=timeout):
                    if not sent_role:
                        yield _chunk(rid, event["model"], {"role": "assistant", "content": ""})
                        sent_role = True
                    if kind == "chunk":
                        yield _chunk(rid, event["model"], {"content": event["delta"]})
                    else:
                        finish = "length" if event["finish_reason"] == "length" else "stop"
                        yield _chunk(rid, event["model"], {}, finish)
                        yield "data: [DONE]\n\n"
            except ResponseTimeout as exc:
                # A truncated stream must never look complete: report the error, send no [DONE].
                yield f"data: {json.dumps(openai_error(str(exc), 'timeout_error'))}\n\n"
            finally:
                gateway.inflight -= 1

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": record["request_id"]})

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackRequest, request: Request) -> dict[str, Any]:
        user = gateway.user_of(request, body.user or request.headers.get("x-flywheel-user"))
        pair: dict[str, Any] | None = None
        if body.kind == "pairwise":
            pair = dict(body.pairwise or {})
            missing = [f for f in PAIRWISE_FIELDS if not pair.get(f)]
            if missing or pair["winner"] not in ("a", "b", "tie"):
                raise GatewayError(400, f"pairwise needs request_id_a, request_id_b and winner in a|b|tie "
                                        f"(missing {missing})", param="pairwise")
            pair["request_id_a"], pair["request_id_b"] = (bare_request_id(str(pair["request_id_a"])),
                                                          bare_request_id(str(pair["request_id_b"])))
            owned = [pair["request_id_a"], pair["request_id_b"]]
            if body.request_id is not None and bare_request_id(body.request_id) not in owned:
                owned.append(bare_request_id(body.request_id))
        elif body.request_id is None:
            raise GatewayError(400, f"{body.kind} feedback needs request_id", param="request_id")
        else:
            owned = [bare_request_id(body.request_id)]
        for rid in owned:
            owner = await gateway.owner_of(rid)
            if owner is None:
                raise GatewayError(404, f"unknown request {rid}", param="request_id")
            if owner != user:
                raise GatewayError(403, f"request {rid} belongs to another user", "permission_error",
                                   param="request_id")
        assert gateway.client is not None
        fields = await gateway.client.complete_feedback(dict(
            user_id=user, request_id=body.request_id or owned[0], kind=body.kind, rating=body.rating,
            thumbs_up=body.thumbs_up, pairwise=pair, implicit=body.implicit))
        if pair is not None:
            unknown = [fields["pairwise"][f"request_id_{s}"] for s in ("a", "b")
                       if not fields["pairwise"].get(f"model_{s}")]
            if unknown:
                raise GatewayError(409, f"no response to {unknown} has been delivered yet, so the models to "
                                        "compare are unknown; retry once both answers arrived", param="pairwise")
        try:
            record = await gateway.client.feedback(**fields)
        except (ValueError, TypeError) as exc:  # e.g. a signal the contract does not know
            raise GatewayError(400, f"invalid feedback: {exc}") from exc
        return {"accepted": True, "feedback_id": record["event_id"], "request_id": record["request_id"],
                "model": record["model"], "model_version": record["model_version"],
                "adapter_version": record["adapter_version"]}

    @app.get("/api/stats")
    async def stats() -> dict[str, Any]:
        return gateway.stats.snapshot()

    @app.get("/dashboard", response_model=None)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC / "dashboard.html", media_type="text/html")

    return app
