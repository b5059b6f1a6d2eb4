"""Select task: calibrate, flag and pick one evaluation on a worker; the report renders the result."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from mace_ood.config import ScoresConfig, SelectConfig
from mace_ood.records import EvaluationPlan, SelectionResult
from mace_ood.runtime import configure_process
from mace_ood.select.stage import select_evaluation
from mace_ood.tasks.console import hide_console_tracebacks


@task(name="select", task_run_name="select {evaluation.family} on {evaluation.dataset}", cache_policy=NO_CACHE)
def select_task(
    evaluation: EvaluationPlan, own: EvaluationPlan, output_dir: str, select: SelectConfig, scores: ScoresConfig,
    validation: EvaluationPlan | None = None, forces_key: str = "REF_forces",
) -> SelectionResult:
    """p-values and ``ood`` against the family's calibration split, rank, the predicted force error
    (with a ``validation`` evaluation) and the picks of one evaluation, written to
    ``selection/<label>.csv`` and ``.json`` under ``output_dir``."""
    configure_process()
    hide_console_tracebacks()
    return select_evaluation(evaluation, own, output_dir, select, scores, validation, forces_key)
