"""`mace-ood` command line: validate, run, serve, evaluate, demo."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from mace_ood.cli.types import (
    BatchSize,
    CacheDir,
    ConfigArg,
    Cron,
    DefaultDtypeOption,
    DeploymentName,
    DeviceOption,
    ForcesKey,
    Labels,
    NBootstrap,
    OutputDir,
    Refresh,
    Retrain,
    RunDirArg,
    Score,
    TopK,
    Workdir,
)
from mace_ood.runtime import configure_process

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Find the structures a MACE model ensemble does not understand (out-of-distribution).",
)


@app.callback()
def _entry() -> None:
    """Find the structures a MACE model ensemble does not understand (out-of-distribution)."""
    configure_process()


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _load(config: Path, output_dir=None, device=None, default_dtype=None, batch_size=None, top_k=None, score=None):
    from mace_ood.config import ConfigError, config_from_dict, load_config

    overrides = {"output_dir": str(output_dir) if output_dir else None, "device": device,
                 "default_dtype": default_dtype, "batch_size": batch_size}
    try:
        cfg = load_config(config, overrides)
        select = {k: v for k, v in (("top_k", top_k), ("score", score)) if v is not None}
        if select:  # validated again: a force score needs `forces: true`
            data = cfg.model_dump(mode="json")
            data["select"].update(select)
            cfg = config_from_dict(data, source=str(config))
        return cfg
    except ConfigError as exc:
        _fail(str(exc))


@app.command()
def validate(
    config: ConfigArg,
    output_dir: OutputDir = None,
    device: DeviceOption = None,
    default_dtype: DefaultDtypeOption = None,
    batch_size: BatchSize = None,
) -> None:
    """Check a config: keys, files, models and families; print the plan (and a SLURM/PBS job script), run nothing."""
    from mace_ood.extract.models import ModelError
    from mace_ood.plan import plan_run
    from mace_ood.structures import InputError

    cfg = _load(config, output_dir, device, default_dtype, batch_size, None)
    try:
        plan = plan_run(cfg, count=False)
    except (InputError, ModelError) as exc:
        _fail(str(exc))
    from mace_ood.runs import groups_of_files

    for dataset, files in plan.files.items():
        try:
            grouping = groups_of_files(files, cfg.scores.group_by, cfg.scores.split_block_frames)
        except InputError as exc:
            _fail(str(exc))
        sizes = sorted(grouping.sizes, reverse=True)
        shown = ", ".join(map(str, sizes[:12])) + (f", ... ({len(sizes) - 12} more)" if len(sizes) > 12 else "")
        typer.echo(f"dataset {dataset}: {len(files)} file(s), {len(grouping.labels)} frames in {grouping.describe()}; "
                   f"frames per group: {shown}")
        for note in grouping.notes:
            typer.echo(f"  note: {note}")
    from mace_ood.plan import family_scores, stores_llpr_forces

    for family, models in plan.models.items():
        m = models[0]
        typer.echo(
            f"family {family}: {len(models)} {'seeds' if len(models) > 1 else 'model'}, r_max={m['r_max']}, "
            f"elements={list(m['atomic_numbers'])}, latent width={m['latent_width']}, heads={list(m['heads'])}"
            + (f" (forces and energies from head {cfg.model_families[family].head!r})"
               if cfg.model_families[family].head else "")
        )
        names, missing = family_scores(cfg, len(models), next(
            (m.get("llpr_unsupported") for m in models if m.get("llpr_unsupported")), None),
            llpr_forces=stores_llpr_forces(cfg, family, len(models)))
        typer.echo(f"  scores: {', '.join(names)}" + (f" (not: {missing})" if missing else ""))
    for evaluation in plan.evaluations:
        ref = " (reference)" if evaluation.reference else ""
        typer.echo(f"evaluation {evaluation.family} -> {evaluation.dataset}{ref}")
    typer.echo(f"{len(plan.jobs)} extraction job(s); output in {cfg.output_dir}")
    from mace_ood.cluster import plain_address_warning
    from mace_ood.flows.server import UnsafeApiError, refuse_unauthenticated_api

    try:
        refuse_unauthenticated_api()
    except UnsafeApiError as exc:
        _fail(str(exc))
    if warning := plain_address_warning(cfg.dask):
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    if cfg.dask.cluster != "local":
        from prefect.settings import get_current_settings

        from mace_ood.jobwatch import unreachable_api_message

        api_url = get_current_settings().api.url or "http://127.0.0.1/api"  # unset: a temporary server, on loopback
        if refusal := unreachable_api_message(cfg.dask.cluster, cfg.dask.jobqueue.queue, str(api_url)):
            _fail(refusal)
        typer.echo(_job_script(cfg))


def _job_script(cfg) -> str:
    """The batch script each job of a SLURM/PBS cluster would be submitted with (a missing
    partition is refused first where `sinfo` answers)."""
    import shutil
    import subprocess

    from mace_ood.cluster import jobqueue_cluster

    queue = cfg.dask.jobqueue.queue
    if cfg.dask.cluster == "slurm" and queue and shutil.which("sinfo"):
        found = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=30)
        if found.returncode == 0 and queue not in found.stdout.split():
            _fail(f"dask.jobqueue.queue: SLURM has no partition {queue!r} (sinfo lists: "
                  f"{', '.join(found.stdout.split()) or 'none'})")
    import tempfile

    with tempfile.TemporaryDirectory() as credentials, jobqueue_cluster(
        cfg.dask, "<the run's PREFECT_API_URL>", cfg.output_dir, credentials_parent=credentials,
        scheduler_options={"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"},
    ) as cluster:
        return f"job script ({cfg.dask.cluster}, up to {cfg.dask.jobqueue.max_jobs} jobs):\n{cluster.job_script()}"


@app.command()
def run(
    config: ConfigArg,
    output_dir: OutputDir = None,
    device: DeviceOption = None,
    default_dtype: DefaultDtypeOption = None,
    batch_size: BatchSize = None,
    top_k: TopK = None,
    score: Score = None,
    refresh: Refresh = False,
) -> None:
    """Extract latents, score, select the top structures and write the reports."""
    cfg = _load(config, output_dir, device, default_dtype, batch_size, top_k, score)
    if refresh:
        cfg = cfg.model_copy(update={"refresh": True})
    result = run_config(cfg)
    from mace_ood.report.build import format_summary

    typer.echo(format_summary(result))


def run_config(cfg) -> dict:
    """Run the Prefect flow on a validated config; bad input exits with a one-line error."""
    from mace_ood.cluster import ClusterError, import_jobqueue
    from mace_ood.extract.models import ModelError
    from mace_ood.flows.server import ServerStartError, UnsafeApiError, refuse_unauthenticated_api
    from mace_ood.plan import plan_run
    from mace_ood.score.latents import ScoreError
    from mace_ood.structures import InputError

    try:
        plan = plan_run(cfg)  # fail fast, before any Prefect or Dask start-up; the flow runs this plan
        refuse_unauthenticated_api()
    except (InputError, ModelError, UnsafeApiError) as exc:
        _fail(str(exc))
    from mace_ood.flows.ood import TaskFailures, ood_detection
    from mace_ood.flows.session import RunSession

    try:
        import_jobqueue(cfg.dask)
        with RunSession(f"mace-ood on {cfg.output_dir}", owns_process=True) as session:
            return session.call(ood_detection, cfg, plan)
    except (InputError, ModelError, ScoreError, ClusterError, ServerStartError, UnsafeApiError, TaskFailures) as exc:
        _fail(str(exc))


@app.command()
def serve(
    config: ConfigArg,
    name: DeploymentName = "ood-detection",
    cron: Cron = None,
) -> None:
    """Serve the flow as a Prefect deployment with this config as its default parameters
    (no work pool needed); runs start from the UI, the API or the schedule."""
    cfg = _load(config)
    from prefect.settings import get_current_settings

    from mace_ood.flows.ood import ood_detection

    if not get_current_settings().api.url:
        typer.secho("warning: PREFECT_API_URL is not set: serving on a temporary server that no UI sees",
                    fg=typer.colors.YELLOW, err=True)
    ood_detection.serve(name=name, parameters={"config": cfg.model_dump(mode="json")}, cron=cron)


@app.command()
def evaluate(
    run_dir: RunDirArg,
    n_bootstrap: NBootstrap = 1000,
    forces_key: ForcesKey = "REF_forces",
    labels: Labels = None,
) -> None:
    """How well each score finds OOD structures: ROC-AUC and rank correlation with the force error."""
    from mace_ood.evaluate import (
        evaluate_run,
        evaluation_data,
        plot_errors,
        plot_evaluation,
        read_labels,
    )
    from mace_ood.files import write_csv

    try:
        structure_labels = read_labels(labels) if labels else None
        data = evaluation_data(run_dir, forces_key, structure_labels)
        table = evaluate_run(run_dir, n_bootstrap, forces_key, labels=structure_labels, data=data)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    csv = write_csv(table, Path(run_dir) / "evaluation.csv")
    png = plot_evaluation(table, Path(run_dir) / "evaluation.png") if len(table) else None
    if "labels_note" in table.attrs:
        typer.echo(table.attrs["labels_note"])
    typer.echo(format_evaluation(table))
    if table.attrs.get("flag_note"):
        typer.echo("\n" + table.attrs["flag_note"])
    errors_png = None
    if table.attrs.get("error_note"):
        typer.echo("\n" + table.attrs["error_note"])
        errors_png = plot_errors(data, Path(run_dir) / "evaluation_errors.png", forces_key)
    typer.echo(f"\n{csv}" + (f"\n{png}" if png else "") + (f"\n{errors_png}" if errors_png else ""))


def format_evaluation(table) -> str:
    """A markdown table: one row per score, one column per (family, dataset, metric)."""
    if table.empty:
        return "nothing to evaluate: no reference forces and no in/out-of-distribution labels"
    short = {"roc_auc_ood_vs_in_distribution": "ROC-AUC", "spearman_vs_force_rmse": "Spearman"}
    cells = table.assign(
        cell=[f"{v:.2f} [{lo:.2f}, {hi:.2f}]" for v, lo, hi in zip(table.value, table.ci_low, table.ci_high, strict=True)],
        column=table.family + " on " + table.dataset + " " + table.metric.map(short),
    )
    columns = list(dict.fromkeys(cells.column))
    cells = cells.pivot(index="score", columns="column", values="cell").reindex(columns=columns)
    cells = cells.reindex([s for s in dict.fromkeys(table.score)]).fillna("")
    header = "| score | " + " | ".join(cells.columns) + " |"
    lines = [header, "|" + "---|" * (len(cells.columns) + 1)]
    lines += ["| " + score + " | " + " | ".join(str(v) for v in row) + " |" for score, row in cells.iterrows()]
    return "\n".join(lines)


@app.command()
def demo(
    workdir: Workdir = Path("demo_work"),
    cache_dir: CacheDir = None,
    retrain: Retrain = False,
) -> None:
    """Make two EMT-labelled Cu datasets, train 4 tiny MACE seeds on each (cached), and run."""
    from mace_ood.demo import prepare_demo

    config_path = prepare_demo(workdir, cache_dir=cache_dir, retrain=retrain, echo=typer.echo)
    typer.echo(f"config: {config_path}")
    cfg = _load(config_path)
    result = run_config(cfg)
    from mace_ood.report.build import format_summary

    typer.echo(format_summary(result))
    from mace_ood.select.table import read_selection_summary

    typer.echo("\nWhat the ood flag promises, and what in-distribution data got:")
    in_distribution = {name for name, is_ood in cfg.ood_labels.items() if not is_ood}
    for row in (r for r in result["summary"] if r["reference"]):
        seen = [f"{r['n_ood']} of {r['n_structures']} flagged on {r['dataset']}" for r in result["summary"]
                if r["family"] == row["family"] and r["dataset"] in in_distribution]
        typer.echo(f"  {row['family']}: {row.get('grouping', '')}; false-flag rate at most {row['delivered_rate']:.3f} "
                   f"at alpha {row['alpha']:g}" + (f"; observed: {', '.join(seen)}" if seen else ""))
        model = read_selection_summary(cfg.output_dir, row["evaluation"]).get("error_model")
        if isinstance(model, dict):
            typer.echo(f"    force error: power law in {model['score']} over {model['n_groups']} validation runs "
                       f"({row.get('validation', '')}); bounds at {model['delivered_level']:.0%} (asked "
                       f"{model['level']:.0%}); their coverage on in-distribution data: below, `mace-ood evaluate`")
    typer.echo("\nHow well does each score find what the models do not know? (`mace-ood evaluate`)")
    evaluate(Path(cfg.output_dir))


def main() -> None:  # pragma: no cover
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
