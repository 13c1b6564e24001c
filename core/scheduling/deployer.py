"""HELR deployer: place model layers on heterogeneous devices, then choose replicas per model.

Level 1, ``place_model`` (UELLM thesis, Algorithm 2). A model of L layers, m GiB each, is cut
into a pipeline over an ordered set of distinct devices. Device i holds at most
cap_i = floor((mem_i - reserve) / m) layers (``reserve`` keeps room for the KV cache) and runs a
layer in ``layer_ms / speed_i``. Per-token latency of a placement is

    sum_i n_i * layer_ms / speed_i  +  sum of link latencies between consecutive stages
    + device_penalty_ms * (#devices)                 (a1 of UELLM's HE/LR trade-off)

For a fixed device *set* the layer counts and the order separate: layers go to the fastest
devices first (each device used takes >= 1 layer), and the order is a minimum-latency
Hamiltonian path over the set's links, solved for every subset at once by the bitmask DP
dp[mask][last] in O(2^n * n^2). Scanning all subsets gives the optimum; a test checks it
against brute force over orders and layer splits.

Level 2, ``plan_deployment``. Given per-model demand (tokens/s), pick disjoint device groups,
each group one replica of one model placed as above. A replica with per-token latency l serves
mu = 1/l tokens/s; traffic of a model is split over its r replicas in proportion to mu, so each
behaves as an M/M/1 queue at load rho = lambda / sum(mu) and the expected per-token latency is

    sum_k (mu_k / sum mu) * l_k / (1 - rho) = r / (sum mu - lambda)        (needs sum mu > lambda).

Objective: demand-weighted mean of that over models. best_mu[r][S] (the largest total service
rate of S split into r replicas) is a subset DP, and models are then added one at a time over
the mask of devices used: O(M * n * 3^n), seconds at most for n <= 8 devices.

Speeds are measured, not assumed: ``flywheel.deployment`` probes every device and takes each
model's per-token latency from the workers' online-calibrated cost models when it has them; the
plan is enforced per worker process (CPU affinity, ``CUDA_VISIBLE_DEVICES``, vLLM pipeline stages
with HELR's layer split). ``round_robin_deployment`` is the baseline it is checked against (here
analytically, in ``bench/scheduling_deploy.py`` in the simulator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float
    speed: float
    """Relative compute speed (1.0 = the device ``layer_ms`` was measured on)."""

    def __post_init__(self) -> None:
        if self.memory_gib <= 0 or self.speed <= 0:
            raise ValueError(f"device {self.name!r}: memory_gib={self.memory_gib} and speed={self.speed} "
                             "must be > 0")


@dataclass(frozen=True)
class ModelProfile:
    name: str
    layers: int
    memory_gib: float
    """Weights of the whole model."""
    per_token_ms: float
    """Decode latency per token of the whole model on a speed-1.0 device."""
    demand_tokens_per_s: float = 0.0
    """Expected load for ``plan_deployment``."""

    def __post_init__(self) -> None:
        if self.layers < 1 or self.memory_gib <= 0 or self.per_token_ms <= 0 or self.demand_tokens_per_s < 0:
            raise ValueError(f"model {self.name!r}: layers={self.layers}, memory_gib={self.memory_gib}, "
                             f"per_token_ms={self.per_token_ms}, "
                             f"demand={self.demand_tokens_per_s} out of range")

    @property
    def layer_gib(self) -> float:
        return self.memory_gib / self.layers

    @property
    def layer_ms(self) -> float:
        return self.per_token_ms / self.layers


@dataclass(frozen=True)
class DeployConfig:
    reserve_gib: float = 0.0
    """Memory kept free on every device for the KV cache and activations (UELLM's T)."""
    device_penalty_ms: float = 0.0
    """Cost per device used: 0 = pure low-latency (LR); large = fewest devices (HE)."""

    def __post_init__(self) -> None:
        if self.reserve_gib < 0 or self.device_penalty_ms < 0:
            raise ValueError(f"reserve_gib={self.reserve_gib} and device_penalty_ms={self.device_penalty_ms} "
                             "must be >= 0")


@dataclass(frozen=True)
class Placement:
    devices: tuple[int, ...]
    """Device indices in pipeline order."""
    layers: tuple[int, ...]
    """Layers on each device, same order; sums to the model's layer count."""
    latency_ms: float
    """Per-token latency including links (without the device penalty)."""
    cost_ms: float
    """The minimised objective: latency plus device penalty."""


@dataclass(frozen=True)
class Replica:
    model: str
    placement: Placement


@dataclass(frozen=True)
class Deployment:
    replicas: tuple[Replica, ...]
    expected_latency_ms: float
    """Demand-weighted expected per-token latency (queueing included)."""


def _capacities(model: ModelProfile, devices: list[Device], cfg: DeployConfig) -> list[int]:
    return [max(math.floor((d.memory_gib - cfg.reserve_gib) / model.layer_gib + 1e-9), 0) for d in devices]


def _split_layers(model: ModelProfile, devices: list[Device], caps: list[int],
                  subset: list[int]) -> dict[int, int] | None:
    """Optimal layer counts for a device set: >= 1 each, the rest to the fastest first."""
    if any(caps[i] < 1 for i in subset) or sum(caps[i] for i in subset) < model.layers:
        return None
    if len(subset) > model.layers:
        return None
    counts = {i: 1 for i in subset}
    left = model.layers - len(subset)
    for i in sorted(subset, key=lambda i: -devices[i].speed):
        take = min(caps[i] - 1, left)
        counts[i] += take
        left -= take
    return counts


def _path_tables(links_ms: list[list[float]], n: int) -> list[list[float]]:
    """dp[mask][last]: cheapest path visiting exactly ``mask`` and ending at ``last``."""
    inf = math.inf
    dp = [[inf] * n for _ in range(1 << n)]
    for i in range(n):
        dp[1 << i][i] = 0.0
    for mask in range(1, 1 << n):
        for last in range(n):
            cur = dp[mask][last]
            if cur == inf or not (mask >> last) & 1:
                continue
            for nxt in range(n):
                if (mask >> nxt) & 1:
                    continue
                to = mask | (1 << nxt)
                dp[to][nxt] = min(dp[to][nxt], cur + links_ms[last][nxt])
    return dp


def _check_links(links_ms: list[list[float]] | None, n: int) -> list[list[float]]:
    if links_ms is None:
        return [[0.0] * n for _ in range(n)]
    if len(links_ms) != n or any(len(row) != n for row in links_ms):
        raise ValueError(f"links_ms must be {n}x{n}")
    if any(v < 0 for row in links_ms for v in row):
        raise ValueError("link latencies must be >= 0")
    return links_ms


def _best_placements(model: ModelProfile, devices: list[Device], links_ms: list[list[float]],
                     cfg: DeployConfig) -> dict[int, Placement]:
    """The optimal placement for every device subset (bitmask) that can hold the model."""
    n = len(devices)
    caps = _capacities(model, devices, cfg)
    dp = _path_tables(links_ms, n)
    out: dict[int, Placement] = {}
    for mask in range(1, 1 << n):
        subset = [i for i in range(n) if (mask >> i) & 1]
        counts = _split_layers(model, devices, caps, subset)
        if counts is None:
            continue
        last = min(subset, key=lambda i: dp[mask][i])
        link_ms = dp[mask][last]
        order = _rebuild_path(dp, links_ms, mask, last)
        compute_ms = sum(counts[i] * model.layer_ms / devices[i].speed for i in subset)
        latency = compute_ms + link_ms
        out[mask] = Placement(devices=tuple(order), layers=tuple(counts[i] for i in order),
                              latency_ms=latency, cost_ms=latency + cfg.device_penalty_ms * len(subset))
    return out


def _rebuild_path(dp: list[list[float]], links_ms: list[list[float]], mask: int, last: int) -> list[int]:
    order = [last]
    while mask & (mask - 1):
        prev_mask = mask & ~(1 << last)
        prev = next(j for j in range(len(links_ms)) if (prev_mask >> j) & 1
                    and math.isclose(dp[prev_mask][j] + links_ms[j][last], dp[mask][last], abs_tol=1e-9))
        order.append(prev)
        mask, last = prev_mask, prev
    return order[::-1]


def place_model(model: ModelProfile, devices: list[Device], links_ms: list[list[float]] | None = None,
                config: DeployConfig | None = None) -> Placement:
    """Lowest-cost pipeline placement of one model (raises ValueError when nothing fits)."""
    if not devices:
        raise ValueError("place_model needs at least one device")
    if len(devices) > 16:
        raise ValueError(f"{len(devices)} devices: the bitmask DP is meant for <= 16")
    cfg = config or DeployConfig()
    table = _best_placements(model, devices, _check_links(links_ms, len(devices)), cfg)
    if not table:
        raise ValueError(f"model {model.name!r} ({model.memory_gib} GiB) fits on no subset of the devices")
    return min(table.values(), key=lambda p: (p.cost_ms, len(p.devices)))


def expected_latency_ms(latencies_ms: list[float], demand_tokens_per_s: float) -> float:
    """r / (sum mu - lambda) in ms for replicas of the given per-token latencies (inf if overloaded)."""
    if not latencies_ms:
        return math.inf
    mu = sum(1000.0 / lat for lat in latencies_ms)
    if mu <= demand_tokens_per_s:
        return math.inf
    return 1000.0 * len(latencies_ms) / (mu - demand_tokens_per_s)


def plan_deployment(models: list[ModelProfile], devices: list[Device],
                    links_ms: list[list[float]] | None = None,
                    config: DeployConfig | None = None) -> Deployment:
    """Replicas and placements for all models that minimise demand-weighted expected latency.

    Every model gets at least one replica. Devices may stay unused. Raises ValueError when no
    assignment serves every model's demand.
    """
    if not models:
        raise ValueError("plan_deployment needs at least one model")
    n = len(devices)
    if n == 0 or n > 12:
        raise ValueError(f"{n} devices: plan_deployment supports 1..12")
    cfg = config or DeployConfig()
    links = _check_links(links_ms, n)
    full = (1 << n) - 1
    total_demand = sum(m.demand_tokens_per_s for m in models)
    # dp over models: mask of devices used -> (objective, chosen replicas)
    best: dict[int, tuple[float, tuple[Replica, ...]]] = {0: (0.0, ())}
    for model in models:
        weight = model.demand_tokens_per_s / total_demand if total_demand > 0 else 1.0 / len(models)
        table = _best_placements(model, devices, links, cfg)
        groups = _best_groupings(table, full)
        nxt: dict[int, tuple[float, tuple[Replica, ...]]] = {}
        for used, (obj, reps) in best.items():
            free = full & ~used
            sub = free
            while sub:
                for _, parts in groups.get(sub, {}).values():
                    lats = [table[p].latency_ms for p in parts]
                    lat = expected_latency_ms(lats, model.demand_tokens_per_s)
                    if math.isinf(lat):
                        continue
                    penalty = cfg.device_penalty_ms * bin(sub).count("1")
                    cand = obj + weight * lat + penalty
                    key = used | sub
                    if key not in nxt or cand < nxt[key][0] - 1e-12:
                        nxt[key] = (cand, reps + tuple(Replica(model.name, table[p]) for p in parts))
                sub = (sub - 1) & free
        if not nxt:
            raise ValueError(f"no deployment serves model {model.name!r} "
                             f"at {model.demand_tokens_per_s} tokens/s")
        best = nxt
    obj, reps = min(best.values(), key=lambda v: v[0])
    return Deployment(replicas=reps, expected_latency_ms=obj)


_Groupings = dict[int, dict[int, tuple[float, tuple[int, ...]]]]


def _best_groupings(table: dict[int, Placement], full: int) -> _Groupings:
    """For every mask S and replica count r: the split of S into r placeable groups with the
    largest total service rate sum(1/latency). Fixing the group holding S's lowest device avoids
    enumerating the same partition twice."""
    out: _Groupings = {}
    for s in range(1, full + 1):
        if s & ~full:
            continue
        low = s & -s
        cands: dict[int, tuple[float, tuple[int, ...]]] = {}
        rest_all = s & ~low
        sub = rest_all
        while True:
            group = sub | low
            if group in table:
                mu = 1.0 / table[group].latency_ms
                rest = s & ~group
                if rest == 0:
                    _keep(cands, 1, mu, (group,))
                else:
                    for r, (mu_rest, parts) in out.get(rest, {}).items():
                        _keep(cands, r + 1, mu + mu_rest, (group, *parts))
            if sub == 0:
                break
            sub = (sub - 1) & rest_all
        if cands:
            out[s] = cands
    return out


def _keep(cands: dict[int, tuple[float, tuple[int, ...]]], r: int, mu: float, parts: tuple[int, ...]) -> None:
    if r not in cands or mu > cands[r][0]:
        cands[r] = (mu, parts)


def round_robin_deployment(models: list[ModelProfile], devices: list[Device],
                           links_ms: list[list[float]] | None = None,
                           config: DeployConfig | None = None) -> Deployment:
    """The baseline HELR is checked against: device i serves model i mod M alone (speeds and links
    ignored), scored by the same objective. Raises ValueError when a model gets no device it fits."""
    if not models or not devices:
        raise ValueError("round_robin_deployment needs models and devices")
    cfg = config or DeployConfig()
    links = _check_links(links_ms, len(devices))
    total_demand = sum(m.demand_tokens_per_s for m in models)
    replicas: list[Replica] = []
    objective = 0.0
    for k, model in enumerate(models):
        mine = [i for i in range(len(devices)) if i % len(models) == k]
        table = _best_placements(model, devices, links, cfg)
        placements = [table[1 << i] for i in mine if (1 << i) in table]
        if not placements:
            raise ValueError(f"round robin gives model {model.name!r} no device it fits on")
        weight = model.demand_tokens_per_s / total_demand if total_demand > 0 else 1.0 / len(models)
        objective += weight * expected_latency_ms([p.latency_ms for p in placements], model.demand_tokens_per_s)
        objective += cfg.device_penalty_ms * len(placements)
        replicas += [Replica(model.name, p) for p in placements]
    return Deployment(replicas=tuple(replicas), expected_latency_ms=objective)
