"""Group level: the named stages (stages/) run in order; each reads what the previous ones wrote to disk.

labels -> split [-> search] -> train -> predict -> interpret -> report [-> export]. Stages are imported when asked
for, so a run of the labels and split stages never loads torch. --maps_dir may name an exported archive: it is
unpacked into OUTPUT_DIR/maps/ first, and the stages see a MAPS folder.

Started by torchrun (or srun) as N processes, the main one runs every stage and the others join it for the
train stage only (data-parallel training); they write nothing.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from clinicadl_app.core.atomic import write_text
from clinicadl_app.core.config import Config
from clinicadl_app.core.distributed import World
from clinicadl_app.core.errors import ExitCode, UsageError
from clinicadl_app.core.logs import log_to_file
from clinicadl_app.layouts.maps import Maps
from clinicadl_app.layouts.output import OutputLayout
from clinicadl_app.layouts.splits import SplitFolder

log = logging.getLogger("clinicadl_app")

IMPLEMENTED = ("labels", "split", "search", "train", "predict", "interpret", "report", "export")


def run(config: Config) -> ExitCode:
    world = World.from_environment()
    if not world.distributed:
        return run_stages(config)
    if "search" in config.execution.stages:
        raise UsageError("--stages search runs one trial per process: start it as several ordinary jobs sharing "
                         "the study (docs/cluster.md), not under torchrun")
    if "train" not in config.execution.stages:
        raise UsageError(f"started as {world.size} processes (torchrun or srun), but --stages has no train stage, "
                         "the only one they share: start the other stages as one process")
    batch = config.train.batch_size
    if batch % world.size:
        raise UsageError(f"--batch_size {batch} is the global batch, shared by {world.size} processes: make it a "
                         f"multiple of {world.size}")
    return run_distributed(config, world)


def run_distributed(config: Config, world: World) -> ExitCode:
    """The main process runs the stages; the others train with it and stop when training ends. A lost peer
    ends every process with one line (exit 75) and the next run resumes from the last completed epoch."""
    import signal

    import torch

    from clinicadl_app.core.distributed import lost_peer

    def stopped(signum, frame):  # torchrun stops the others when one process fails
        raise world.lost(RuntimeError(f"stopped by signal {signal.Signals(signum).name}"))

    signal.signal(signal.SIGTERM, stopped)
    world.start(config.train.gpu)
    try:
        if world.main:
            return run_stages(config, world)
        from clinicadl_app.core.allocator import keep_freed_memory

        log.setLevel(logging.WARNING)  # the main process tells the story once
        keep_freed_memory()
        torch.set_num_threads(config.execution.cpus)
        layout = OutputLayout(config.output_dir)
        world.barrier()  # the main process has run the stages before train
        from clinicadl_app.group.stages.train import run_training

        run_training(config, layout.splits_dir, layout.maps_dir, world)
        world.barrier()
        return ExitCode.OK
    except Exception as error:
        if lost_peer(error):
            raise world.lost(error) from None
        raise
    finally:
        world.stop()


def run_stages(config: Config, world: World | None = None) -> ExitCode:
    stages = config.execution.stages
    missing = [stage for stage in stages if stage not in IMPLEMENTED]
    if missing:
        raise UsageError(
            f"stage(s) {', '.join(missing)} are not implemented yet in this version; "
            f"run --stages {' '.join(s for s in stages if s in IMPLEMENTED) or 'labels split'}"
        )
    layout = OutputLayout(config.output_dir)
    layout.prepare(config.bids_dir)
    log_to_file(layout.run_record("group", ".log"))
    write_text(layout.run_record("group", ".toml"), config.to_toml())
    folder = SplitFolder(layout.splits_dir / config.labels.folder)
    if config.predict.maps_dir is not None and config.predict.maps_dir.is_file():
        from clinicadl_app.group.archive import unpack

        config = replace(config, predict=replace(config.predict, maps_dir=unpack(config.predict.maps_dir,
                                                                                  layout.maps_dir)))
    if {"search", "train", "predict", "interpret"} & set(stages):
        import torch

        from clinicadl_app.core.allocator import keep_freed_memory

        keep_freed_memory()
        torch.set_num_threads(config.execution.cpus)
    reproduction = None
    if config.execution.reproduce is not None:
        from clinicadl_app.group.archive import unpack
        from clinicadl_app.group.reproduction import Reproduction

        original = config.execution.reproduce
        reproduction = Reproduction.open(unpack(original, layout.maps_dir) if original.is_file() else original)
        reproduction.announce(config)
    if "labels" in stages:
        from clinicadl_app.group.stages.labels import run_labels

        run_labels(config, folder)
    if "split" in stages:
        from clinicadl_app.group.stages.split import run_split

        run_split(config, folder)
        if reproduction is not None:  # before any training: another draw makes the rest meaningless
            reproduction.check_split(folder, Maps(layout.maps_dir / config.train.experiment))
    if "search" in stages:
        from clinicadl_app.group.stages.search import run_search

        run_search(config, layout.splits_dir, layout.search_dir)
    if "train" in stages:
        from clinicadl_app.group.stages.train import run_training

        if world is not None:
            world.barrier()  # the other processes wait here for the labels and split
        maps = run_training(config, layout.splits_dir, layout.maps_dir, world)
        if world is not None:
            world.barrier()
            if set(stages) - {"labels", "split", "train"}:
                torch.set_num_threads(config.execution.cpus_alone)
                log.info("training done; the other processes end here: the next stages run in this one on %d "
                         "thread(s)", config.execution.cpus_alone)
        if reproduction is not None:
            reproduction.compare(folder, maps)
    if "predict" in stages:
        from clinicadl_app.group.stages.predict import run_predict

        run_predict(config, layout.maps_dir)
    if "interpret" in stages:
        from clinicadl_app.group.stages.interpret import run_interpret

        run_interpret(config, layout.maps_dir)
    if "report" in stages:
        from clinicadl_app.group.stages.report import run_report

        report = run_report(config, layout.maps_dir)
        pages = layout.qc_pages(config.caps_dir)
        log.info("open %s (results)%s", report, f"; participant quality-check pages: {pages}" if pages else "")
    if "export" in stages:
        from clinicadl_app.group.stages.export import run_export

        run_export(config, layout.maps_dir)
    return ExitCode.OK
