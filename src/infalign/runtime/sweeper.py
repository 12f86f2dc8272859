"""Every member of a sweep checked before the first one trains; a study preset refused without `-m`.

`CheckedSweeper` is Hydra's `BasicSweeper` with one step in front: `sweep()` composes every member's config, as the
launcher will, and runs the config check on each. A refused member stops the sweep before Hydra writes anything:
one line `error: member <k> (<its overrides>): <message>`, exit status 2 (without it, `python train.py -m
scale=smoke n=2,16` trained member 0, then stopped at member 1). Hydra instantiates sweepers only from its plugin
namespace: conf/hydra/sweeper/infalign.yaml names `hydra_plugins.infalign_sweeper.InfalignSweeper`, this class;
`hydra/sweeper=basic` runs Hydra's own, unchecked. Stdlib, omegaconf and Hydra only at import: Hydra imports the
plugin on every start of every Hydra app in this environment.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf, open_dict

from infalign.runtime.errors import ConfigError, exit_on_user_error

__all__ = ["CheckedSweeper", "refuse_study_without_multirun"]


def _member_overrides(sweeper: BasicSweeper, arguments: Sequence[str]) -> list[list[str]]:
    """The members' overrides in the order BasicSweeper.sweep runs them (`hydra.sweeper.params` first, then the
    command line's task overrides, expanded as its `split_arguments` does)."""
    params = sweeper._parse_config() + list(arguments)
    overrides = OverridesParser.create(config_loader=sweeper.hydra_context.config_loader).parse_overrides(params)
    return [member for batch in sweeper.split_arguments(overrides, sweeper.max_batch_size) for member in batch]


class CheckedSweeper(BasicSweeper):
    """BasicSweeper that composes and checks every member's config before it launches any (module docstring)."""

    def __init__(self, max_batch_size: int | None = None, params: Mapping[str, str] | None = None) -> None:
        # BasicSweeper.__init__'s own attributes, set here: it calls `super(BasicSweeper, self)` with its module's
        # current `BasicSweeper`, and Hydra's plugin scan executes that module again when it was imported before the
        # scan (train.py imports this module first), so the name there is then another class than this one's base.
        Sweeper.__init__(self)
        self.overrides: Sequence[Sequence[Sequence[str]]] | None = None
        self.batch_index = 0
        self.max_batch_size = max_batch_size
        self.params = dict(params) if params else {}
        self.hydra_context = None
        self.config: DictConfig | None = None
        self.launcher = None
        self._checked: set[tuple[str, ...]] = set()

    def sweep(self, arguments: list[str]) -> Any:
        self.check_members(arguments)
        return super().sweep(arguments)

    def check_members(self, arguments: Sequence[str]) -> None:
        """Compose and check every member; the first refused one exits (one line, status 2)."""
        from infalign.config.check import check_config  # the config package: only when a sweep starts

        loader = self.hydra_context.config_loader
        members = _member_overrides(self, arguments)
        master = HydraConfig.instance().cfg  # restored below, as Hydra's run_job restores it
        try:
            for num, overrides in enumerate(members):
                cfg = loader.load_sweep_config(self.config, list(overrides))
                with open_dict(cfg.hydra):  # as the launcher numbers it (hydra.job.num: the member's subdir)
                    cfg.hydra.job.num = num
                # `${hydra:...}` in the member's values (a study's beta grid keyed by the method choice) and the
                # preset check (its command-line overrides) read Hydra's config of this member
                HydraConfig.instance().set_config(cfg)
                choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
                task_cfg = copy.deepcopy(cfg)  # the config the member's task function gets: no `hydra` node
                with open_dict(task_cfg):
                    del task_cfg["hydra"]
                try:
                    check_config(task_cfg, choices, multirun=True)  # warnings: the member reports its own when it runs
                except ConfigError as e:
                    exit_on_user_error(ConfigError(f"member {num} ({' '.join(overrides)}): {e}"))
                self._checked.add(tuple(overrides))
        finally:
            HydraConfig.instance().cfg = master

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Hydra composes each batch's members again before it launches them: those checked above are not."""
        unchecked = [overrides for overrides in batch if tuple(overrides) not in self._checked]
        if unchecked:
            super().validate_batch_is_legal(unchecked)


def refuse_study_without_multirun(choices: Mapping | DictConfig, task_overrides: Sequence[str],
                                  multirun: bool) -> None:
    """A study preset run without `-m`: ConfigError naming the command that runs it (its sweep's members are set
    by the preset's `hydra.sweeper.params`, which only a multirun reads)."""
    study = choices.get("study")
    if multirun or study in (None, "null"):
        return
    command = " ".join(["python train.py -m", *(str(o) for o in task_overrides)])
    raise ConfigError(f"study={study} is a sweep: run it with -m ({command})")
