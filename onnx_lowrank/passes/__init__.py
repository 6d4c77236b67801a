"""The compression pipeline as passes: the framework (`base`), the built-in passes, and the
default pipeline for a set of settings (`pipeline.default_pipeline`)."""

from onnx_lowrank.passes.base import (
    ARTIFACTS, LayerDecision, LayerResult, Pass, PassResult, PassTiming, Pipeline, Tracker, Workspace, plain_tracker,
)
from onnx_lowrank.passes.budget import BudgetPass
from onnx_lowrank.passes.factorize import FactorizePass
from onnx_lowrank.passes.finish import CountPass, ValidatePass
from onnx_lowrank.passes.fit_aware import FitAwareBudgetPass
from onnx_lowrank.passes.guard import GuardPass
from onnx_lowrank.passes.judge import LatencyJudge
from onnx_lowrank.passes.pipeline import default_pipeline, inspect_pipeline, rank_policy
from onnx_lowrank.passes.prepare import CanonicalizePass, FindLayersPass, FoldPass, LoadInputsPass, SelectLayersPass
from onnx_lowrank.passes.rewrite import RewritePass, projected_model, rewritten_model
from onnx_lowrank.passes.shared import SharedStatistics
from onnx_lowrank.passes.statistics import DataSpectraPass, OutputGainsPass

__all__ = [
    "ARTIFACTS", "BudgetPass", "CanonicalizePass", "CountPass", "DataSpectraPass", "FactorizePass",
    "FindLayersPass", "FitAwareBudgetPass", "FoldPass", "GuardPass", "LatencyJudge", "LayerDecision", "LayerResult", "LoadInputsPass",
    "OutputGainsPass", "Pass", "PassResult", "PassTiming", "Pipeline", "RewritePass", "SelectLayersPass", "SharedStatistics",
    "Tracker", "ValidatePass", "Workspace", "default_pipeline", "inspect_pipeline", "plain_tracker",
    "projected_model", "rank_policy", "rewritten_model",
]
