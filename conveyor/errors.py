"""The error hierarchy. Every error a user can cause is a ConveyorError: the CLIs print its
message on one line and exit with its exit code, never with a traceback."""


class ConveyorError(Exception):
    """Base class: something the user can fix. The message says what and how."""

    exit_code = 1

    def __init_subclass__(cls, exit_code: int | None = None, **kwargs) -> None:
        # `class ConfigError(ConveyorError, exit_code=2)`: the code beside the name, one line.
        super().__init_subclass__(**kwargs)
        if exit_code is not None:
            cls.exit_code = exit_code


class ConfigError(ConveyorError, exit_code=2):
    """A config or scenario file is missing, malformed or invalid."""


class UsageError(ConveyorError, exit_code=2):
    """A command-line argument is out of range or names something unknown."""


class BrokerError(ConveyorError, exit_code=3):
    """The broker cannot be reached, or refused us."""


class PublishRefused(BrokerError):
    """The broker returned a message no queue took (a `mandatory` publish) or refused (nacked) it."""


class PublishInterrupted(BrokerError):
    """The connection a batch was published on broke: its unconfirmed messages are neither sent nor refused."""


class RecordStoreError(ConveyorError, exit_code=3):
    """The task-record store (Redis or the SQLite file) cannot be reached or refused us."""


class StackError(ConveyorError, exit_code=4):
    """Worker processes or containers could not be started, scaled or stopped."""


class DispatchTimeout(ConveyorError, exit_code=5):
    """Tasks did not finish within the time the caller allowed."""
