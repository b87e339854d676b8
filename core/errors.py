"""Errors that reach the user as one line, with exit code 2 and no traceback."""


class PipelineError(Exception):
    """A problem the user can fix: bad recipe, missing file, unsupported model.

    `field` names the recipe field at fault (``stages[1].sparsity``); the message says what is
    allowed. The CLI prints ``error: <field>: <message>`` and exits with code 2.
    """

    exit_code = 2

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class RecipeError(PipelineError):
    """The recipe is malformed or refers to something that does not exist."""


class StageFailed(PipelineError):
    """A stage ran but its result is not acceptable (e.g. ONNX parity over tolerance)."""

    exit_code = 1


class GateRejected(PipelineError):
    """The run completed but its artifact misses the recipe's quality gate (``evaluation.accept``):
    the run folder is written and marked rejected, and it is not published."""

    exit_code = 1


class EnvironmentFailure(PipelineError):
    """The machine, not the input: a file it may not read, a folder it may not write, a full disk
    (exit code 1). The message says what to do, including how to resume a run that was under way."""

    exit_code = 1
