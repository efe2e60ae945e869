"""One exception type for every user-facing failure.

The CLI catches `PeftVisionError` and prints its message as one line; anything else is a bug and
keeps its traceback. Messages say what is wrong *and* what to do about it.
"""


class PeftVisionError(Exception):
    """A problem with the user's input (model, method, file, data) rather than a bug in peftvision."""


class UnsupportedModelError(PeftVisionError):
    """The timm model lacks the structure a method needs (no transformer blocks, no fused qkv, ...)."""


class AdapterFileError(PeftVisionError):
    """An adapter directory is missing, corrupt, truncated or belongs to another base model."""


class BaseMismatchError(AdapterFileError):
    """An adapter was trained on other base weights than the model it is put on (serving refuses it)."""


class AdapterExistsError(PeftVisionError):
    """An adapter is added under a name that is already taken."""


class UnknownAdapterError(PeftVisionError):
    """A request names an adapter that is not loaded."""


class ConfigError(PeftVisionError):
    """An unknown method, an unknown option or an invalid value."""


class DataError(PeftVisionError):
    """A dataset spec that cannot be resolved: missing folder, unknown task, unreadable image, ..."""


class Interrupted(PeftVisionError):
    """Ctrl-C or SIGTERM during training: the last finished epoch is saved and can be resumed."""


class TrainingDiverged(PeftVisionError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
