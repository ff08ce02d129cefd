"""User-facing errors: the CLI prints each as one line and exits non-zero."""


class CspganError(Exception):
  """Base class of the errors a user can cause (bad config, file, data or checkpoint)."""


class ConfigError(CspganError):
  """A config file or override that cannot be used."""


class CheckpointError(CspganError):
  """A checkpoint that is missing, unreadable, or does not fit the model."""


class DataError(CspganError):
  """Input data that cannot be used."""
