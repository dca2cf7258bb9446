"""Chat templates: a model's own Jinja template turns a list of messages into its prompt.

The template and the special tokens it may use (``bos_token``, ``eos_token``) live in the
checkpoint's ``tokenizer_config.json``, as in every Hugging Face repository; GGUF imports
write it from the file's ``tokenizer.chat_template`` metadata. Rendering follows
``transformers``' ``apply_chat_template``: a sandboxed, immutable Jinja environment with
``trim_blocks`` and ``lstrip_blocks``, ``raise_exception`` available to the template (the
Llama-2 and Mistral templates call it on a bad role order) and the rendered text encoded
*without* the tokenizer's own special tokens (the template already wrote them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from earlyexit.errors import InputError

CONFIG = "tokenizer_config.json"


class ChatTemplateError(InputError):
    """The messages do not fit the model's chat template (its own message), or it has none."""


def load_chat_config(model_dir: str | Path) -> dict[str, Any] | None:
    """The ``tokenizer_config.json`` of a model directory when it has a chat template (in
    it, or beside it as ``chat_template.jinja``, as recent ``transformers`` saves it)."""
    try:
        data = json.loads((Path(model_dir) / CONFIG).read_text())
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    jinja = Path(model_dir) / "chat_template.jinja"
    if not isinstance(data.get("chat_template"), str) and jinja.is_file():
        data["chat_template"] = jinja.read_text()
    return data if isinstance(data.get("chat_template"), str) else None


def chat_files(config: dict[str, Any] | None) -> dict[str, str] | None:
    """``extra_files`` for :func:`earlyexit.io.checkpoint.save_checkpoint` that keep a chat
    template (None when there is none): conversions and fine-tunes pass it on."""
    return {CONFIG: json.dumps(config, indent=2) + "\n"} if config else None


def _token(value) -> str:
    """A special token as tokenizer_config.json stores it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def validate_messages(messages) -> list[dict[str, str]]:
    """``messages`` must be a non-empty list of {role, content} strings."""
    ok = (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )
    )
    if not ok:
        raise ChatTemplateError("'messages' must be a non-empty list of {role, content} objects")
    return messages


class ChatTemplate:
    """A model's chat template compiled once (the server renders it per request)."""

    def __init__(self, config: dict[str, Any]) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ChatTemplateError(f"the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(config["chat_template"])
        self.bos, self.eos = _token(config.get("bos_token")), _token(config.get("eos_token"))

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages``; :class:`ChatTemplateError` (with the template's
        own message where it raises one) when they do not fit."""
        from jinja2 import TemplateError

        messages = validate_messages(messages)
        try:
            return self.template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos,
                eos_token=self.eos,
            )
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None


def render(config: dict[str, Any] | None, messages, add_generation_prompt: bool = True) -> str:
    """The prompt text of ``messages`` under ``config``'s chat template."""
    if not config or not isinstance(config.get("chat_template"), str):
        raise ChatTemplateError(
            "this model has no chat template (no tokenizer_config.json chat_template)"
        )
    return ChatTemplate(config).render(messages, add_generation_prompt)
