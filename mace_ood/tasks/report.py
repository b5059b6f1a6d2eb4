"""Report task: render what the select tasks decided as files, and publish the Prefect UI artifacts."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from mace_ood.config import RunConfig
from mace_ood.records import EvaluationPlan, ReportResult, SelectionResult, SkippedStructure
from mace_ood.report.build import build_report
from mace_ood.tasks.artifacts import publish_artifacts
from mace_ood.tasks.console import hide_console_tracebacks


@task(name="report", cache_policy=NO_CACHE)
def write_report(
    config: RunConfig, evaluations: list[EvaluationPlan], selections: list[SelectionResult],
    skipped: list[SkippedStructure], stages: dict[str, list[dict]] | None = None,
) -> ReportResult:
    """scores.csv, top-K structures, skipped.csv, report.xlsx; returns paths and the top rows, with
    ``stages`` (the flow's records of each extraction, scoring and selection) beside them.

    Also publishes, for the Prefect UI, a table artifact of the top K of each evaluation and
    a markdown summary with the file locations.
    """
    hide_console_tracebacks()
    result = {**build_report(config, evaluations, selections, skipped), **(stages or {})}
    publish_artifacts(result, config)
    return result
