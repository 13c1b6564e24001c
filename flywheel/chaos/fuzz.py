"""Property-based fuzzing of every deserializer and of the gateway's request handling (hypothesis).

A *crash* is any exception other than the typed ones a stage handles: ``DeadLetterError``
(SerializationError / ValidationError: the record goes to a dead-letter topic) for events, and
pydantic's ValidationError or a ``GatewayError`` 4xx for HTTP bodies. Inputs: random bytes,
truncated records, flipped bytes, unknown schema ids, invalid UTF-8, huge prompts, and negative,
non-finite or absurd budgets, temperatures and token limits.
"""

from __future__ import annotations

import asyncio
import json
import math
import traceback
from dataclasses import dataclass, field
from typing import Any

import pydantic
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from core.errors import DeadLetterError
from core.validation import RequestLimits, validate_request
from streams.registry import InMemoryRegistry
from streams.samples import samples
from streams.schemas import load_contracts
from streams.serde import AvroSerde, frame

LIMITS = RequestLimits(max_prompt_chars=32_000, max_tokens=1024)


@dataclass
class FuzzReport:
    cases: int = 0
    crashes: int = 0
    examples: list[str] = field(default_factory=list)

    def crash(self, what: str, exc: BaseException) -> None:
        self.crashes += 1
        if len(self.examples) < 5:
            self.examples.append(f"{what}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")

    def merge(self, other: FuzzReport) -> FuzzReport:
        return FuzzReport(self.cases + other.cases, self.crashes + other.crashes, self.examples + other.examples)


def _hypothesis(cases: int) -> settings:
    return settings(max_examples=cases, database=None, deadline=None, derandomize=False,
                    phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))


async def _serde() -> tuple[AvroSerde, dict[str, bytes]]:
    serde = AvroSerde(InMemoryRegistry())
    encoded = {}
    for name, record in samples().items():
        await serde.bind(f"fuzz.{name}", load_contracts()[name])
        encoded[name] = serde.serialize(f"fuzz.{name}", record)
    return serde, encoded


def fuzz_deserializers(cases: int) -> FuzzReport:
    """Decode hostile bytes on every contract's topic: a dict or a DeadLetterError, nothing else."""
    serde, encoded = asyncio.run(_serde())
    names = sorted(encoded)
    report = FuzzReport()
    loop = asyncio.new_event_loop()

    def attempt(data: bytes, what: str) -> None:
        report.cases += 1
        try:
            loop.run_until_complete(serde.deserialize(data))
        except DeadLetterError:
            pass
        except Exception as exc:
            report.crash(what, exc)

    mutations = st.one_of(
        st.binary(max_size=2048).map(lambda b: ("random bytes", None, b)),
        st.tuples(st.sampled_from(names), st.integers(0, 10_000)).map(
            lambda t: ("truncated", t[0], encoded[t[0]][: t[1] % max(1, len(encoded[t[0]]))])),
        st.tuples(st.sampled_from(names), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                   min_size=1, max_size=8)).map(
            lambda t: ("flipped", t[0], _flip(encoded[t[0]], t[1]))),
        st.tuples(st.integers(1000, 2**31 - 1), st.binary(max_size=256)).map(
            lambda t: ("unknown schema id", None, frame(t[0], t[1]))),
        st.sampled_from(names).map(lambda n: ("invalid utf-8", n, _bad_utf8(encoded[n]))),
    )

    @_hypothesis(cases)
    @given(mutations)
    def run(case: tuple[str, str | None, bytes]) -> None:
        what, name, data = case
        attempt(data, f"{what} {name or ''}")

    try:
        run()
    finally:
        loop.close()
    return report


def _flip(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        out[position % len(out)] = value
    return bytes(out)


def _bad_utf8(data: bytes) -> bytes:
    """Overwrite the first string value ("evt-...", our event ids) with bytes that are not UTF-8."""
    at = data.find(b"evt-")
    if at < 0:
        return data + b"\xff"
    return data[:at] + b"\xff\xfe\xfd\xfc" + data[at + 4:]


_finite_or_not = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.none())


def fuzz_requests(cases: int) -> FuzzReport:
    """Build InferenceRequests with hostile field values, push them through serialize ->
    deserialize -> validate_request: every outcome is a valid request or a DeadLetterError."""
    serde, _ = asyncio.run(_serde())
    base = samples()["InferenceRequest"]
    report = FuzzReport()
    loop = asyncio.new_event_loop()
    text = st.one_of(st.text(max_size=64), st.just(""), st.just("x" * 40_000), st.just("  \n "))

    @_hypothesis(cases)
    @given(prompt=st.one_of(text, st.none()), messages=st.lists(st.tuples(
               st.sampled_from(["system", "user", "assistant"]), text), max_size=4),
           max_tokens=st.integers(-2**31, 2**31 - 1), budget=_finite_or_not, wtp=_finite_or_not,
           temperature=st.floats(allow_nan=True, allow_infinity=True), top_p=st.floats(allow_nan=True),
           user=st.text(max_size=8), stops=st.lists(st.text(max_size=8), max_size=6))
    def run(prompt: str | None, messages: list[tuple[str, str]], max_tokens: int, budget: float | None,
            wtp: float | None, temperature: float, top_p: float, user: str, stops: list[str]) -> None:
        record = dict(base, prompt=prompt, messages=[{"role": r, "content": c} for r, c in messages],
                      max_tokens=max_tokens, budget_usd=budget, willingness_to_pay=wtp, user_id=user,
                      sampling={"temperature": temperature, "top_p": top_p, "seed": None, "stop": stops})
        report.cases += 1
        try:
            data = serde.serialize("fuzz.InferenceRequest", record)
            _, decoded = loop.run_until_complete(serde.deserialize(data))
            validate_request(decoded, LIMITS)
            assert decoded["max_tokens"] >= 1 and (budget is None or budget >= 0) and not math.isnan(temperature)
        except DeadLetterError:
            pass
        except Exception as exc:
            report.crash("request", exc)

    try:
        run()
    finally:
        loop.close()
    return report


_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                  max_size=5), max_leaves=20)


def fuzz_gateway_bodies(cases: int) -> FuzzReport:
    """Hostile chat-completion bodies: rejected with a 4xx, or turned into a request that the rest
    of the pipeline accepts (the gateway never forwards what the router would dead-letter)."""
    from flywheel.gateway.api import ChatCompletionRequest
    from flywheel.gateway.app import Gateway, GatewayError
    from infra.settings import Settings

    gateway = Gateway(Settings())
    serde, _ = asyncio.run(_serde())
    report = FuzzReport()
    limits = RequestLimits(gateway.settings.max_prompt_chars, gateway.settings.max_tokens_limit)
    def mostly(valid: Any, hostile: Any) -> Any:  # plausible values, with hostile ones mixed in
        return st.one_of(valid, valid, valid, hostile)

    near_valid = st.fixed_dictionaries({
        "model": mostly(st.sampled_from(["auto", "smollm2-135m", "gemma3-270m"]), st.sampled_from(["gpt-9", ""])),
        "messages": st.lists(st.fixed_dictionaries({
            "role": mostly(st.sampled_from(["user", "system", "assistant", "developer"]), st.just("robot")),
            "content": st.one_of(st.text(max_size=40), st.just("y" * 40_000),
                                 st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text()}),
                                          max_size=2))}), max_size=3),
        "max_tokens": mostly(st.integers(1, 1024), st.one_of(st.none(), st.integers(-10, 10**9))),
        "temperature": mostly(st.floats(0, 2), st.floats(allow_nan=True, allow_infinity=True)),
        "budget_usd": mostly(st.floats(0, 1), _finite_or_not),
        "willingness_to_pay": mostly(st.floats(0, 1e6), _finite_or_not),
        "stop": mostly(st.lists(st.text(max_size=10), max_size=4), st.one_of(st.none(), st.text(max_size=100))),
        "n": mostly(st.just(1), st.integers(-1, 3)), "stream": st.booleans()})
    bodies = st.one_of(
        near_valid.map(lambda d: json.dumps(d).encode()),
        _json.map(lambda d: json.dumps(d).encode()),
        st.binary(max_size=512),
        st.just(b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    )

    valid = json.dumps({"model": "auto", "max_tokens": 16,
                        "messages": [{"role": "user", "content": "What is 2+3?"}]}).encode()

    @_hypothesis(cases)
    @given(bodies)
    @example(valid)  # the accept path is always exercised, whatever the generator draws
    def run(body: bytes) -> None:
        report.cases += 1
        try:
            request = ChatCompletionRequest.model_validate_json(body)
            record = gateway.build_request(request, "fuzzer")
        except (pydantic.ValidationError, GatewayError):
            return
        except Exception as exc:
            report.crash("gateway body", exc)
            return
        try:  # accepted: it must be a valid event end to end
            data = serde.serialize("fuzz.InferenceRequest", record)
            _, decoded = asyncio.run(serde.deserialize(data))
            validate_request(decoded, limits)
        except Exception as exc:
            report.crash("gateway accepted an invalid request", exc)

    run()
    return report


def fuzz_all(cases: int) -> dict[str, Any]:
    """``cases`` inputs split across the targets; returns the counts for ``flywheel chaos``."""
    third = max(1, cases // 3)
    report = fuzz_deserializers(third).merge(fuzz_requests(third)).merge(fuzz_gateway_bodies(cases - 2 * third))
    return {"cases": report.cases, "crashes": report.crashes, "examples": report.examples}
