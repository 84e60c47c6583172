"""The command line every recipe shares: `python -m workbench.recipes.<name>_loop --log-path DIR [--flag V ...]`.

    if __name__ == "__main__":
        run_recipe_cli(__doc__, Config, main, {"dataset": str, "learning_rate": float, "max_steps": int})

One `--kebab-case` flag per Config field named in `options` (its type as given, its default the
Config's), `--log-path` always; the recipe's summary dict is printed at the end. `build` turns the
parsed values into Config keyword arguments where a flag is not a field of Config itself (e.g. sft's
`--dcp-save-interval`, which lives in its WeightSyncConfig).
"""

from __future__ import annotations

import argparse
import logging
from typing import Callable


def run_recipe_cli(doc: str, config_cls: type, main: Callable, options: dict[str, type],
                   build: Callable[[dict], dict] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--log-path", required=True, help="the run's directory: a rerun with it resumes the run")
    for name, kind in options.items():
        default = getattr(config_cls, name, None)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default,
                            help=f"Config.{name} (default: {default})")
    values = vars(parser.parse_args())
    if build is not None:
        values = build(values)
    print(main(config_cls(**values)))
