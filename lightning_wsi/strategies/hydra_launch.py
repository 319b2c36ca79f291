"""Re-running a Hydra sweep's job, not the sweep, for the ranks a launcher starts.

Lightning's ``popen`` launcher starts ranks 1..N-1 by re-running the command with
``sys.argv[1:]`` (plus ``hydra.run.dir``). Inside a ``-m`` sweep that is the whole sweep: each
rank ran every job again, into the same folders. For a sweep's job the ranks get that job's own
overrides instead (``HydraConfig.overrides.task``: the swept values already chosen), as a
single run in the job's folder; a single run keeps Lightning's command.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.strategies.launchers import subprocess_script as _lightning
from typing_extensions import override

__all__ = ["HydraJobLauncher", "rank_command"]

_LIGHTNING_COMMAND = _lightning._hydra_subprocess_cmd  # a single run's: Lightning's own


def rank_command(local_rank: int) -> tuple[Sequence[str], str]:
    """The command and working folder that start ``local_rank`` of the current Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from hydra.utils import get_original_cwd, to_absolute_path

    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return _LIGHTNING_COMMAND(local_rank)
    import __main__

    if __main__.__spec__ is None:  # a script
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += [*hydra.overrides.task]
    command += [
        f'hydra.run.dir="{hydra.runtime.output_dir}"',
        f"hydra.job.name={hydra.job.name}_rank{local_rank}",
        "hydra.output_subdir=null",  # the job's .hydra/ is rank 0's
    ]
    return command, get_original_cwd()


class HydraJobLauncher(_SubprocessScriptLauncher):
    """Lightning's ``popen`` launcher, whose ranks re-run a sweep's job rather than the sweep."""

    @override
    def _call_children_scripts(self) -> None:
        _lightning._hydra_subprocess_cmd = rank_command  # what the method below calls
        try:
            super()._call_children_scripts()
        finally:
            _lightning._hydra_subprocess_cmd = _LIGHTNING_COMMAND
