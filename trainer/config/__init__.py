"""Settings schema (``trainer.config.settings``) and loader (``trainer.config.loader``).

Library code imports only the schema; reading YAML and overrides happens at the CLI edge.
"""
from trainer.config.settings import Settings, settings_to_yaml

__all__ = ["Settings", "settings_to_yaml"]
