"""User-facing errors: the CLI prints them as one line and exits with code 2 (no traceback)."""


class UserError(Exception):
    """A mistake in what the user asked for (bad config, missing file, unsafe checkpoint...)."""


class ConfigError(UserError):
    """An invalid configuration key, type or value."""
