"""Running a build's datatrove tasks on a cluster: Slurm (submit, then load on a later run) or Ray.

The pipeline is the same one the local executor runs; datatrove's SlurmPipelineExecutor pickles
it and writes an sbatch array script (one array task per datatrove task). Submission returns at
once: the build prints the job id, and running the same `msm corpus build` command again after
the job ends finds every task complete, skips submission and loads the staged shards. Workers
on a cluster write their own call-cache shard (network filesystems make SQLite locking
unreliable); the loader reads every shard.

`--dry-run` writes the script and the pickled pipeline without calling sbatch, so it can be
read, edited or submitted by hand (`sbatch launch_script.slurm`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SlurmSettings:
    partition: str = "cpu"
    time: str = "24:00:00"
    cpus_per_task: int = 2
    mem_per_cpu_gb: int = 4
    venv: str | None = None  # a virtualenv's activate script; default: this interpreter's
    sbatch_args: dict = field(default_factory=dict)


def submit_slurm(pipeline: list, tasks: int, workers: int, logs: Path, job_name: str, settings: SlurmSettings,
                 dry_run: bool) -> tuple[str | None, Path]:
    """(job id, or None for a dry run; the launch script's path)."""
    import sys

    import datatrove.executor.slurm as slurm

    venv = settings.venv or str(Path(sys.executable).parent / "activate")
    executor = slurm.SlurmPipelineExecutor(
        pipeline=pipeline, tasks=tasks, workers=workers if workers > 1 else -1, time=settings.time,
        partition=settings.partition, cpus_per_task=settings.cpus_per_task, mem_per_cpu_gb=settings.mem_per_cpu_gb,
        job_name=job_name, venv_path=venv, sbatch_args=dict(settings.sbatch_args), logging_dir=str(logs),
        slurm_logs_folder=str(logs / "slurm"), qos=None, mail_type="NONE")
    script = logs / "launch_script.slurm"
    if not dry_run:
        executor.run()
        return str(executor.job_id), script
    # datatrove has no dry run: let it write everything it writes for a launch, but hand the
    # script to us instead of to sbatch.
    real_launch = slurm.launch_slurm_job
    slurm.launch_slurm_job = lambda contents, retriever, *args: "dry-run"
    try:
        executor.launch_job()
    finally:
        slurm.launch_slurm_job = real_launch
    return None, script


def ray_executor(pipeline: list, tasks: int, workers: int, logs: Path, cpus_per_task: int = 1,
                 mem_per_cpu_gb: float = 2):
    """datatrove's RayPipelineExecutor on the cluster in RAY_ADDRESS, or a local Ray instance.

    It blocks until the tasks end, like the local executor, so the build loads right after.
    """
    import os

    try:
        import ray
    except ImportError:
        from msm.errors import MsmError

        raise MsmError("--executor ray needs the ray package", "pip install 'msm[ray]' (or pip install ray)") from None
    from datatrove.executor.ray import RayPipelineExecutor

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", configure_logging=True)
    return RayPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers if workers > 1 else -1,
                               logging_dir=str(logs), cpus_per_task=cpus_per_task, mem_per_cpu_gb=mem_per_cpu_gb)
