"""tracelib: explain why a language model predicts an answer, on TransformerLens."""

from tracelib.answers import (
    AnswerStep,
    EmptyInputError,
    MultiTokenAnswerError,
    PromptTooLongError,
    ResolvedAnswer,
    answer_direction,
    chat_prompt,
    resolve_answer,
)
from tracelib.models import (
    BUNDLED_MODELS,
    ModelUnavailableError,
    UnknownModelError,
    load_model,
)
from tracelib.notebook import setup_notebook

__version__ = "0.1.0"

__all__ = [
    "BUNDLED_MODELS",
    "AnswerStep",
    "EmptyInputError",
    "ModelUnavailableError",
    "MultiTokenAnswerError",
    "PromptTooLongError",
    "ResolvedAnswer",
    "UnknownModelError",
    "answer_direction",
    "chat_prompt",
    "load_model",
    "resolve_answer",
    "setup_notebook",
]
