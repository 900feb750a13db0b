"""All devstack exceptions. Root: ``DevstackError``."""


class DevstackError(Exception):
    """Root of every devstack failure."""


class ComponentStartError(DevstackError):
    """A component (broker, swtpm, token) did not come up; the message says which and why."""

    def __init__(self, component: str, reason: str) -> None:
        super().__init__(f"{component} did not start: {reason}")
        self.component = component
        self.reason = reason


class ToolMissingError(DevstackError):
    """A required executable is not installed; ``make setup`` installs it."""

    def __init__(self, tool: str) -> None:
        super().__init__(f"{tool} not found on PATH; run `make setup` (installs Debian packages)")
        self.tool = tool


class SpeechRenderError(DevstackError):
    """espeak-ng failed or produced unusable audio for a sentence."""


class PKIError(DevstackError):
    """The dev CA refused a request (bad name, foreign certificate) or found its files unusable."""
