"""The error hierarchy. Every error a user can cause is a ConveyorError: the CLIs print its
message on one line and exit with its exit code, never with a traceback."""


class ConveyorError(Exception):
    """Base class: something the user can fix. The message says what and how."""

    exit_code = 1


class ConfigError(ConveyorError):
    """A config or scenario file is missing, malformed or invalid."""

    exit_code = 2


class UsageError(ConveyorError):
    """A command-line argument is out of range or names something unknown."""

    exit_code = 2


class BrokerError(ConveyorError):
    """The broker cannot be reached, or refused us."""

    exit_code = 3


class PublishRefused(BrokerError):
    """The broker returned a message no queue took (a `mandatory` publish) or refused (nacked) it."""


class PublishInterrupted(BrokerError):
    """The connection a batch was published on broke: its unconfirmed messages are neither sent nor refused."""


class StackError(ConveyorError):
    """Worker processes or containers could not be started, scaled or stopped."""

    exit_code = 4


class DispatchTimeout(ConveyorError):
    """Tasks did not finish within the time the caller allowed."""

    exit_code = 5


class RecordStoreError(ConveyorError):
    """The task-record store (Redis or the SQLite file) cannot be reached or refused us."""

    exit_code = 3
