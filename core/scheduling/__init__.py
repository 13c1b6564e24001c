"""UELLM scheduling, pure: length predictor, batching policies, step-cost model, simulator, deployer."""

from core.scheduling.cost import StepCostModel, fit_step_cost
from core.scheduling.deployer import (
    DeployConfig,
    Deployment,
    Device,
    ModelProfile,
    Placement,
    Replica,
    place_model,
    plan_deployment,
)
from core.scheduling.goodput import SloGoodput
from core.scheduling.kv import BlockLedger, KvBudget
from core.scheduling.length import LengthDistribution
from core.scheduling.policies import (
    POLICIES,
    Plan,
    Scheduler,
    SchedulerConfig,
    StepResult,
    Verdict,
    make_scheduler,
)
from core.scheduling.predictor import LengthPrediction, LengthPredictor, PredictorConfig, bucket_of, evaluate
from core.scheduling.simulator import Metrics, RequestOutcome, SimRequest, simulate, summarize
from core.scheduling.state import RequestStatus, SchedRequest, is_transition_valid

__all__ = [
    "POLICIES",
    "BlockLedger",
    "DeployConfig",
    "Deployment",
    "Device",
    "KvBudget",
    "LengthDistribution",
    "LengthPrediction",
    "LengthPredictor",
    "Metrics",
    "ModelProfile",
    "Placement",
    "Plan",
    "PredictorConfig",
    "Replica",
    "RequestOutcome",
    "RequestStatus",
    "SchedRequest",
    "Scheduler",
    "SchedulerConfig",
    "SimRequest",
    "SloGoodput",
    "StepCostModel",
    "StepResult",
    "Verdict",
    "bucket_of",
    "evaluate",
    "fit_step_cost",
    "is_transition_valid",
    "make_scheduler",
    "place_model",
    "plan_deployment",
    "simulate",
    "summarize",
]
