"""Train the demo with monitors, LR warmup and alarms configured entirely from YAML, through LightningCLI.

    python examples/cli.py fit --config examples/deadunits.yaml
    python examples/cli.py fit --config examples/deadunits.yaml --trainer.max_steps 20   # a quick look
    python examples/cli.py fit --config examples/deadunits.yaml --print_config           # every setting

Every threshold and action is a constructor argument of a callback listed under ``trainer.callbacks``, so the
YAML is the whole configuration: copy it and edit the numbers. Needs the ``examples`` extra (scikit-learn for
the digits, jsonargparse for the CLI).
"""

from digits_demo import DigitsClassifier
from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI on ``args`` (default: the command line) and return it, e.g. for tests."""
    return LightningCLI(DigitsClassifier, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
