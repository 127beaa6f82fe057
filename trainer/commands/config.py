"""``unet-train config show``: the merged settings as YAML."""
from __future__ import annotations

import argparse

from trainer.commands.settings import load_cli_settings
from trainer.config.settings import settings_to_yaml


def cmd_config(args: argparse.Namespace) -> int:
    print(settings_to_yaml(load_cli_settings(args)), end="")
    return 0
