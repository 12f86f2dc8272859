"""infalign's sweeper as a Hydra plugin: Hydra instantiates a `hydra.sweeper._target_` only from this namespace
(`hydra_plugins`), so conf/train.yaml names this class. The sweeper itself: infalign.runtime.sweeper."""

from infalign.runtime.sweeper import CheckedSweeper


class InfalignSweeper(CheckedSweeper):
    """Hydra's BasicSweeper that checks every member's config before the first member trains."""
