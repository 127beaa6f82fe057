"""Settings schema and loader. Import this at the CLI edge only."""
from trainer.config.loader import load_settings, settings_to_yaml
from trainer.config.settings import Settings

__all__ = ["Settings", "load_settings", "settings_to_yaml"]
