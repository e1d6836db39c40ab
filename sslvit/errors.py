"""One exception type for bad user input, so scripts can print one line instead of a traceback."""


class ConfigError(ValueError):
    """Bad user input (config value, dataset, checkpoint). The message names the problem and the fix."""
