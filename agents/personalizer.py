"""The personalisation agent: Feedback -> per-user adapters -> AdapterPublished (ASLS + CoMiGS).

A user's adapter is a CoMiGS mixture (``personalizer_adapter_kind = "comigs"``, the default:
shared generalist experts, the user's specialists and a token router on the last MLPs; see
``models.adapters.mixture_trainer``) or a plain LoRA (``"lora"``). ASLS decides when a user's
adapter updates and how much; for mixtures, every ``personalizer_round_users`` distinct users'
updates close a round: their generalists are averaged and the next update of every user starts
from that average. Adapters are pinned to the base version they were trained on: when the
trainer publishes a new base, the ``models-to-rebase`` agent re-trains users' adapters on it from
their stored signals within ``personalizer_rebase_budget_s``; users it does not reach are served
by the base until their next update.

Four faust agents share one process:

* ``requests-to-shown`` and ``responses-to-shown`` keep the join table ``personalizer_shown``
  (prompt from the request, text and adapter version from the final response), so feedback,
  which names only a request id, can be turned into training signals;
* ``feedback-to-adapters`` applies each Feedback event in order (the feedback topic has one
  partition): join, fold into the user's profile (``core.personalization``), score the new
  preference pairs with the user's current adapter (the agreement signal), let the ASLS strategy
  decide, and when it says so train the user's adapter (bounded in wall time, warm-started from
  the current one), store it under its content hash and announce it;
* ``models-to-rebase`` follows the trainer's ModelPublished events for the personalised model.

Nothing acknowledged is lost: the user's state, the applied-event marker and the registry row are
one Postgres transaction, and the announcement goes out in the same Kafka transaction as the
feedback offset. If the process dies between the two, the redelivered event is recognised as
applied and its announcement is re-sent with the same event id (workers treat it idempotently);
a redelivered ModelPublished re-sends the announcements of users already re-based onto it.
Adapter training runs in a worker thread, one at a time (one lock serialises the two agents that
train); the event loop keeps serving the joins.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import faust

from agents.base import FaustSink, decode, exits_on_error, make_app, process_each, raw_topic, run_agent_process
from agents.personalizer_store import PersonalizerStore, Shown, StateConflict, adapter_published
from core.errors import ValidationError
from core.personalization import ASLSConfig, ASLSStrategy, FeedbackEvent, ShownResponse, feedback_event_from_record
from core.personalization.online import AdapterRef, OnlineConfig, OnlinePersonalizer, UpdatePlan, UserState
from core.scheduling.yielding import BackoffConfig
from infra.connect import Services
from infra.settings import Settings
from infra.telemetry import ADAPTER_UPDATE_SECONDS, ADAPTERS_PUBLISHED
from infra.yielding import ServingPressureWatcher, run_as_background
from streams.dlq import DeadLetters
from streams.events import event_time_ms, prompt_text
from streams.replay import read_topics

log = logging.getLogger(__name__)


def asls_config(settings: Settings) -> ASLSConfig:
    """The ASLS rule's parameters, with the operator's overrides from the settings."""
    base = ASLSConfig()
    return replace(base, base_batch=settings.personalizer_base_batch,
                   min_batch=min(settings.personalizer_min_batch, settings.personalizer_base_batch),
                   max_batch=max(base.max_batch, settings.personalizer_base_batch),
                   max_updates_per_hour=settings.personalizer_max_updates_per_hour,
                   agree_octaves=settings.personalizer_agree_octaves)


def referenced_requests(feedback: dict[str, Any]) -> list[str]:
    """Every request whose response a feedback event is about."""
    ids = [str(feedback["request_id"])]
    if feedback.get("kind") == "pairwise" and feedback.get("pairwise"):
        ids += [str(feedback["pairwise"]["request_id_a"]), str(feedback["pairwise"]["request_id_b"])]
    return ids


class Personalizer:
    """Applies feedback events; owns the adapter trainer (loaded once, used by one thread)."""

    def __init__(self, settings: Settings, store: PersonalizerStore, services: Services | None = None,
                 pressure: ServingPressureWatcher | None = None) -> None:
        self.settings = settings
        self.store = store
        self.services = services
        self.pressure = pressure
        """When set, adapter training waits (bounded) while workers hold requests."""
        self.online = OnlinePersonalizer(OnlineConfig(min_events=settings.personalizer_min_events),
                                         ASLSStrategy(asls_config(settings)))
        self.store_root = settings.artifacts_dir.resolve() / "adapters"
        self.generalist_root = settings.artifacts_dir.resolve() / "generalists"
        self.mixtures = settings.personalizer_adapter_kind == "comigs"
        self._trainer: Any = None
        self._loading = asyncio.Lock()
        self.training = asyncio.Lock()
        """Held while the trainer's weights or working adapter are in use (both agents train)."""

    async def trainer(self) -> Any:
        async with self._loading:
            if self._trainer is None:
                model = self.settings.personalizer_model
                log.info("loading %s for %s training", model, "mixture" if self.mixtures else "adapter")
                if self.mixtures:
                    from models.adapters.mixture_trainer import MixtureTrainer

                    self._trainer = await asyncio.to_thread(MixtureTrainer.from_catalog, model, self.store_root)
                else:
                    from models.adapters import AdapterTrainer

                    self._trainer = await asyncio.to_thread(AdapterTrainer.from_catalog, model, self.store_root)
                latest = await self._newest_base()
                if latest is not None:  # train on the base workers serve now
                    await asyncio.to_thread(self._trainer.set_base, latest["version"], Path(latest["uri"]))
            return self._trainer

    async def _newest_base(self) -> dict[str, Any] | None:
        """The newest ModelPublished for the personalised model whose files are on this host."""
        if self.services is None:
            return None
        latest: dict[str, Any] | None = None
        for r in await read_topics(self.services.kafka, [self.services.catalog.models_topic]):
            _, event = await self.services.serde.deserialize(r.value)
            mine = event["model"] == self.settings.personalizer_model
            if mine and (latest is None or event["step"] > latest["step"]):
                latest = event
        if latest is not None and not Path(latest["uri"]).exists():
            log.warning("base %s is not on this host (%s); training on the original weights", latest["version"],
                        latest["uri"])
            return None
        return latest

    async def join(self, feedback: dict[str, Any]) -> tuple[FeedbackEvent, dict[str, Shown]]:
        wanted = referenced_requests(feedback)
        shown = await self.store.shown(wanted, self.settings.personalizer_join_wait_s)
        missing = [r for r in wanted if r not in shown]
        if missing:
            raise ValidationError(f"feedback {feedback['event_id']} is about responses never seen by the "
                                  f"personaliser: {missing}")
        foreign = [r for r in wanted if shown[r].user_id != feedback["user_id"]]
        if foreign:
            raise ValidationError(f"user {feedback['user_id']!r} gave feedback on other users' requests {foreign}")

        def lookup(request_id: str) -> ShownResponse | None:
            s = shown.get(request_id)
            return s.response if s is not None else None

        try:
            event = feedback_event_from_record({**feedback, "event_time": event_time_ms(feedback)}, lookup)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValidationError(f"feedback {feedback['event_id']} breaks its contract: {exc}") from exc
        if event is None:
            raise ValidationError(f"feedback {feedback['event_id']} cannot be joined to its responses")
        return event, shown

    async def handle(self, feedback: dict[str, Any]) -> list[dict[str, Any]]:
        """Apply one feedback event; return the AdapterPublished events to send (maybe none)."""
        for _ in range(3):
            try:
                async with self.training:
                    return await self._handle(feedback)
            except StateConflict as exc:  # an operator rollback landed meanwhile: apply to the new state
                log.info("%s; re-applying feedback %s", exc, feedback["event_id"])
        raise StateConflict(f"feedback {feedback['event_id']}: user state kept changing")

    async def _handle(self, feedback: dict[str, Any]) -> list[dict[str, Any]]:
        feedback_id = str(feedback["event_id"])
        if await self.store.applied(feedback_id):
            return await self.store.announcements_for(feedback_id)  # a redelivery: re-send, never re-apply
        event, shown = await self.join(feedback)
        user = await self.store.user(event.user_id)
        read_version = user.last_version
        user, signals = self.online.ingest(user, event)
        trainer = await self.trainer()
        current_dir = Path(user.current.uri) if user.current else None
        margins: dict[int, float] = {}
        if signals.pairs:
            values = await asyncio.to_thread(trainer.margins, signals.pairs, current_dir)
            margins = {p.seq: m for p, m in zip(signals.pairs, values, strict=True)}
        produced_with = shown[event.response.request_id].adapter_version
        user, plan = self.online.plan(user, event, signals, margins, produced_with)
        announcement, contribution = None, None
        if plan.batch is not None:
            announcement, user, contribution = await self._update(trainer, user, plan, feedback, current_dir)
        else:
            log.debug("user %s: no update (%s)", user.user_id, plan.reason)
        await self.store.apply(user, read_version, feedback_id, announcement, contribution)
        if contribution is not None:
            await self._maybe_close_round(contribution[1])
        return [announcement] if announcement else []

    async def _train(self, trainer: Any, user_id: str, pairs: Any, sft: Any, current_dir: Path | None, lr: float,
                     steps: int, budget_s: float) -> tuple[Any, tuple[int, Path | None]]:
        """One adapter update (mixtures start from the current round's generalists)."""
        round_, generalist = (await self.store.current_round()) if self.mixtures else (0, None)
        if self.pressure is not None:
            await self.pressure.wait_for_quiet()  # learning yields to serving (bounded)
        extra = {"generalist_dir": Path(generalist) if generalist else None} if self.mixtures else {}
        update = await asyncio.to_thread(
            lambda: trainer.update(user_id, pairs, sft, current_dir, lr=lr, steps=steps, time_budget_s=budget_s,
                                   **extra))
        ADAPTER_UPDATE_SECONDS.observe(update.metrics["seconds"])
        return update, (round_, Path(generalist) if generalist else None)

    async def _update(self, trainer: Any, user: UserState, plan: UpdatePlan, feedback: dict[str, Any],
                      current_dir: Path | None) -> tuple[dict[str, Any], UserState, tuple[str, int] | None]:
        batch = plan.batch
        assert batch is not None
        decision = plan.decision
        update, (round_, _) = await self._train(trainer, user.user_id, batch.pairs, batch.sft, current_dir,
                                                decision.lr, decision.steps,
                                                self.settings.personalizer_update_budget_s)
        parent = user.current.adapter_hash if user.current else None
        user = self.online.committed(user, batch, update.hash, str(update.path.resolve()),
                                     feedback_time_s(feedback))
        metrics = {**update.metrics, "agreement": decision.agreement, "drift": decision.drift, "lr": decision.lr,
                   "replay": float(batch.n_replay), "pending": float(batch.n_pending), "round": float(round_)}
        log.info("user %s: adapter v%d %s (%s; %d pending + %d replay signals)", user.user_id,
                 user.current.version if user.current else 0, update.hash[:12], plan.reason,
                 batch.n_pending, batch.n_replay)
        event = adapter_published(user, feedback, self.settings.personalizer_model, trainer.config.rank, parent,
                                  metrics, base_version=trainer.base_version)
        return event, user, (str(update.path.resolve()), round_) if self.mixtures else None

    async def _maybe_close_round(self, round_: int) -> None:
        """Average the round's generalists once enough distinct users contributed (CoMiGS)."""
        from models.adapters.mixture_trainer import aggregate_generalists

        current, _ = await self.store.current_round()
        if current != round_:
            return
        contributions = await self.store.round_contributions(round_)
        if len(contributions) < self.settings.personalizer_round_users:
            return
        users = sorted(contributions)
        digest, path = await asyncio.to_thread(
            aggregate_generalists, [Path(contributions[u]) for u in users], self.generalist_root)
        if await self.store.close_round(round_, digest, str(path.resolve()), users):
            log.info("CoMiGS round %d: generalists of %d users averaged (%s)", round_ + 1, len(users), digest[:12])

    # --- a new base version ------------------------------------------------------------------------
    async def rebase(self, model_event: dict[str, Any]) -> list[dict[str, Any]]:
        """Move to the trainer's new base and re-train users' adapters onto it within the budget.

        Returns the announcements to send: re-based users' new adapters, and (after a
        redelivery) the current announcements of users already on this base."""
        from models.adapters.pin import read_pin

        if model_event["model"] != self.settings.personalizer_model:
            return []
        version, uri = str(model_event["version"]), Path(model_event["uri"])
        if not uri.exists():
            log.warning("base %s is not on this host (%s); adapters keep their base", version, uri)
            return []
        trainer = await self.trainer()
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + self.settings.personalizer_rebase_budget_s
        async with self.training:
            await asyncio.to_thread(trainer.set_base, version, uri)
            skipped = 0
            for user in await self.store.users_with_adapters():
                assert user.current is not None
                if read_pin(user.current.uri)[1] == version:
                    event = await self.store.announcement_of(user.user_id, user.current.version)
                    if event is not None:
                        out.append(event)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not (user.pairs or user.sft):
                    skipped += 1
                    continue
                try:
                    out.append(await self._rebase_user(
                        trainer, user, min(remaining, self.settings.personalizer_update_budget_s)))
                except StateConflict as exc:  # an operator rollback landed: its next update re-bases it
                    log.info("%s; not re-basing %s now", exc, user.user_id)
                    skipped += 1
        log.info("base %s: %d adapters re-based, %d users fall back to the base until their next update",
                 version, sum(1 for e in out if e.get("metrics", {}).get("rebase")), skipped)
        return out

    async def _rebase_user(self, trainer: Any, user: UserState, budget_s: float) -> dict[str, Any]:
        assert user.current is not None
        read_version = user.last_version
        update, (round_, _) = await self._train(
            trainer, user.user_id, user.pairs, user.sft, Path(user.current.uri), asls_config(self.settings).base_lr,
            self.settings.personalizer_rebase_steps, budget_s)
        parent = user.current.adapter_hash
        version = user.last_version + 1
        user = replace(user, current=AdapterRef(version, update.hash, str(update.path.resolve())),
                       last_version=version)
        event = adapter_published(user, None, self.settings.personalizer_model, trainer.config.rank, parent,
                                  {**update.metrics, "rebase": 1.0, "round": float(round_)},
                                  base_version=trainer.base_version)
        contribution = (str(update.path.resolve()), round_) if self.mixtures else None
        await self.store.apply(user, read_version, None, event, contribution)
        return event


def feedback_time_s(feedback: dict[str, Any]) -> float:
    return event_time_ms(feedback) / 1000.0


def build(services: Services) -> faust.App:
    app = make_app("personalizer", services)
    sink = FaustSink(app, services)
    dlq = DeadLetters(sink, services.catalog.dlq("personalizer"), "personalizer")  # type: ignore[arg-type]
    catalog = services.catalog
    store = PersonalizerStore(services.pool)
    pressure = ServingPressureWatcher(services, BackoffConfig(max_wait_s=services.settings.background_max_wait_s))
    personalizer = Personalizer(services.settings, store, services, pressure)

    @app.agent(raw_topic(app, catalog.requests), name="requests-to-shown")
    @exits_on_error
    async def requests_to_shown(stream: Any) -> None:
        async for event in stream.events():
            request = await decode(services, event, dlq)
            if request is not None:
                await store.record_prompt(request["request_id"], request["user_id"], prompt_text(request))

    @app.agent(raw_topic(app, catalog.responses), name="responses-to-shown")
    @exits_on_error
    async def responses_to_shown(stream: Any) -> None:
        async for event in stream.events():
            response = await decode(services, event, dlq)
            if response is not None and not response.get("error"):
                await store.record_response(response["request_id"], response["user_id"], response["text"],
                                            response["model"], response.get("adapter_version"))

    @app.agent(raw_topic(app, catalog.feedback), name="feedback-to-adapters")
    @exits_on_error
    async def feedback_to_adapters(stream: Any) -> None:
        async def handle(feedback: dict[str, Any]) -> None:
            for announcement in await personalizer.handle(feedback):
                await sink.send(catalog.adapters, announcement, key=announcement["user_id"])
                ADAPTERS_PUBLISHED.inc()

        await process_each(stream, services, dlq, handle)

    @app.agent(raw_topic(app, catalog.models_topic), name="models-to-rebase")
    @exits_on_error
    async def models_to_rebase(stream: Any) -> None:
        async def handle(model_event: dict[str, Any]) -> None:
            for announcement in await personalizer.rebase(model_event):
                await sink.send(catalog.adapters, announcement, key=announcement["user_id"])
                ADAPTERS_PUBLISHED.inc()

        await process_each(stream, services, dlq, handle)

    @app.task
    async def warm_up() -> None:
        run_as_background(services.settings.background_nice)  # the whole process yields the CPU to serving
        await pressure.start()
        await personalizer.trainer()  # load the base model before the first feedback needs it

    return app


def main(settings: Settings) -> int:
    return run_agent_process("personalizer", settings, build)
