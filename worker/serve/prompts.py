"""The managed prompts a worker serves: the operator's prompts.json, reloaded when it changes.

The operator renders the PromptVersions an LLMDeployment references into one ConfigMap key,
`prompts.json`, mounted at $KVOPS_PROMPTS_DIR (format: docs/architecture.md). A kubelet update
swaps the whole file at once, so a changed file is read whole; one that does not parse is logged
and the previous content keeps serving. Rendering is the operator's own pure implementation
(kvops.operator.prompts), so a template renders the same in an evaluation and in serving.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from kvops.operator.api import ChatMessage, ModelParameters, PromptVariable, PromptVersionSpec
from kvops.operator.prompts import render_messages
from kvops.worker.serve.telemetry import PromptLabel

log = logging.getLogger(__name__)

FILE_NAME = "prompts.json"
# The label a request gets when it names neither a version nor a label (PromptRef's default).
DEFAULT_LABEL = "production"
# How often, at most, a lookup checks whether the file changed (one stat call).
POLL_INTERVAL_S = 2.0


class _FileModel(BaseModel):
    # Fields a newer operator adds are ignored, so that an operator upgrade never breaks a worker.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class _Version(_FileModel):
    prompt_version: str
    version: str
    content_hash: str
    template: list[ChatMessage] = Field(min_length=1)
    variables: list[PromptVariable] = Field(default_factory=list)
    model_parameters: ModelParameters = Field(default_factory=ModelParameters)


class _Prompt(_FileModel):
    labels: dict[str, str] = Field(default_factory=dict)
    versions: dict[str, _Version] = Field(default_factory=dict)


class _Unresolved(_FileModel):
    name: str
    label: str
    reason: str


class _PromptsFile(_FileModel):
    prompts: dict[str, _Prompt] = Field(default_factory=dict)
    unresolved: list[_Unresolved] = Field(default_factory=list)


class UnknownPrompt(LookupError):
    """The request names a prompt, version or label this worker does not serve."""


@dataclass(frozen=True)
class ResolvedPrompt:
    """One version of a prompt, ready to render."""

    name: str
    version: str
    content_hash: str
    spec: PromptVersionSpec

    @property
    def label(self) -> PromptLabel:
        """What its requests' metrics and spans carry."""
        return PromptLabel(self.name, self.version)

    @property
    def model_parameters(self) -> ModelParameters:
        return self.spec.model_parameters

    def render(self, variables: dict[str, str]) -> list[dict[str, str]]:
        """The chat messages; kvops.operator.prompts.RenderError (a ValueError) says what is
        wrong with the variables or the template."""
        return render_messages(self.spec, variables)


class PromptStore:
    """The prompts in `directory`/prompts.json; with no directory, none."""

    def __init__(self, directory: str | os.PathLike | None, poll_interval: float = POLL_INTERVAL_S):
        self.path = None if directory is None else Path(directory) / FILE_NAME
        self.poll_interval = poll_interval
        self._content = _PromptsFile()
        self._specs: dict[tuple[str, str], PromptVersionSpec] = {}
        # (inode, mtime, size) of the file last read, parsed or not; None: not read yet.
        self._seen: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")
        # Why the file last read could not be used, for the errors of requests that miss.
        self.problem: str | None = None
        self.refresh()

    def refresh(self) -> None:
        """Read the file if it changed since the last read (the kubelet swaps it atomically)."""
        self._checked_at = time.monotonic()
        if self.path is None:
            return
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            if self._seen is None and self.problem is None:
                self.problem = f"{self.path} does not exist (yet)"
                log.warning("prompts: %s; serving no managed prompts until it does", self.problem)
            return
        seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if seen == self._seen:
            return
        self._seen = seen
        try:
            content = _PromptsFile.model_validate_json(self.path.read_bytes())
            specs = {
                (name, key): _spec(name, version)
                for name, prompt in content.prompts.items()
                for key, version in prompt.versions.items()
            }
        except (OSError, ValueError) as error:  # a ValidationError is a ValueError
            self.problem = f"{self.path} could not be used: {_summary(error)}"
            log.error("prompts: %s; still serving the previous prompts", self.problem)
            return
        self._content, self._specs, self.problem = content, specs, None
        log.info(
            "prompts: loaded %s",
            ", ".join(
                f"{name} (versions {', '.join(p.versions)}; labels "
                f"{', '.join(f'{k}={v}' for k, v in p.labels.items()) or 'none'})"
                for name, p in content.prompts.items()
            )
            or "no prompts",
        )

    def resolve(
        self, name: str, version: str | None = None, label: str | None = None
    ) -> ResolvedPrompt:
        """The version a request names, or the one `label` (production by default) points to.
        UnknownPrompt when there is none, saying what there is."""
        if time.monotonic() - self._checked_at >= self.poll_interval:
            self.refresh()
        prompt = self._content.prompts.get(name)
        if prompt is None:
            served = ", ".join(sorted(self._content.prompts)) or "none"
            why = f"; {self.problem}" if self.problem else ""
            raise UnknownPrompt(f"prompt {name!r} is not served here (prompts: {served}){why}")
        if version is None:
            label = label or DEFAULT_LABEL
            held = prompt.labels.get(label)
            if held is None:
                raise UnknownPrompt(self._unheld_label(name, label, prompt))
            version = held
        found = prompt.versions.get(version)
        if found is None:
            known = ", ".join(prompt.versions) or "none"
            raise UnknownPrompt(f"prompt {name!r} has no version {version!r} (versions: {known})")
        return ResolvedPrompt(name, found.version, found.content_hash, self._specs[name, version])

    def _unheld_label(self, name: str, label: str, prompt: _Prompt) -> str:
        reasons = [u.reason for u in self._content.unresolved if (u.name, u.label) == (name, label)]
        labels = ", ".join(f"{k}={v}" for k, v in prompt.labels.items()) or "none"
        message = f"no version of prompt {name!r} holds the label {label!r} (labels: {labels})"
        return f"{message}: {reasons[0]}" if reasons else message


def _spec(name: str, version: _Version) -> PromptVersionSpec:
    return PromptVersionSpec(
        prompt_name=name,
        version=version.version,
        template=version.template,
        variables=version.variables,
        model_parameters=version.model_parameters,
    )


def _summary(error: Exception) -> str:
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the file"
        return f"{where}: {first['msg']} ({error.error_count()} error(s))"
    return f"{type(error).__name__}: {error}"
