"""tracelib: explain why a language model predicts an answer, on TransformerLens."""

from tracelib._version import __version__ as __version__
from tracelib.alignment import align_tokens
from tracelib.answers import (
    AnswerStep,
    ByteFragmentError,
    EmptyInputError,
    MultiTokenAnswerError,
    PromptTooLongError,
    ResolvedAnswer,
    answer_direction,
    chat_prompt,
    resolve_answer,
)
from tracelib.attribution import Attribution, Reconstruction, ReconstructionWarning
from tracelib.compare import Comparison, compare
from tracelib.formats import TracelibWarning
from tracelib.heads import Heads, HeadSources, attention_patterns
from tracelib.identity import ModelGoneError, ModelIdentity, ModelMismatchError, model_identity
from tracelib.lean_processing import LeanLoadWarning
from tracelib.lens import LensCurve, LogitLens
from tracelib.margin import Margin
from tracelib.models import (
    BUNDLED_MODELS,
    ModelLoadError,
    ModelUnavailableError,
    UnknownModelError,
    load_model,
)
from tracelib.notebook import setup_notebook
from tracelib.ood import DamageReport, Injection, UndertrainedTokens, damage_report, find_undertrained_tokens, inject
from tracelib.patching import (
    LayerStartWarning,
    PatchingAgreement,
    PatchingResult,
    ReadableVsCausal,
    SameMetricError,
    WeakCorruptionWarning,
    attribution_patch,
    compare_patching,
    patch,
    readable_vs_causal,
)
from tracelib.positions import Positions
from tracelib.reference import load_reference
from tracelib.reference_format import (
    ReferenceChecksumError,
    ReferenceConflictError,
    ReferenceContentError,
    ReferenceFormatError,
    ReferenceLeftoverWarning,
    ReferenceMissingFileError,
    ReferenceModelMismatchError,
    ReferenceOverwriteError,
    ReferenceShapeError,
    ReferenceTokenizerMismatchError,
    ReferenceTruncatedError,
    ReferenceVersionError,
    ReferenceWriteError,
    TraceReferenceError,
)
from tracelib.routes import RouteAgreement, Routes, routes
from tracelib.shortcuts import direct_logit_attribution, logit_lens, logit_margin
from tracelib.smollm2 import fetch_smollm2
from tracelib.studies import (
    Study,
    StudyFolderError,
    StudyMismatchError,
    StudySpecError,
    StudyVersionWarning,
    arithmetic_items,
    load_study,
    parse_injection,
    read_items,
    study,
)
from tracelib.trace import NonFiniteError, Trace, default_distractors, trace
from tracelib.widgets import Explorer, explore

__all__ = [
    "ModelIdentity",
    "ModelMismatchError",
    "model_identity",
    "BUNDLED_MODELS",
    "AnswerStep",
    "Attribution",
    "ByteFragmentError",
    "Comparison",
    "DamageReport",
    "EmptyInputError",
    "Explorer",
    "HeadSources",
    "Heads",
    "Injection",
    "LensCurve",
    "LogitLens",
    "Margin",
    "ModelGoneError",
    "ModelLoadError",
    "ModelUnavailableError",
    "MultiTokenAnswerError",
    "NonFiniteError",
    "PatchingAgreement",
    "PatchingResult",
    "Positions",
    "PromptTooLongError",
    "ReadableVsCausal",
    "Reconstruction",
    "ReconstructionWarning",
    "ResolvedAnswer",
    "SameMetricError",
    "Trace",
    "UndertrainedTokens",
    "UnknownModelError",
    "WeakCorruptionWarning",
    "LayerStartWarning",
    "TracelibWarning",
    "LeanLoadWarning",
    "align_tokens",
    "answer_direction",
    "attention_patterns",
    "attribution_patch",
    "chat_prompt",
    "compare",
    "compare_patching",
    "damage_report",
    "explore",
    "fetch_smollm2",
    "default_distractors",
    "direct_logit_attribution",
    "find_undertrained_tokens",
    "inject",
    "load_model",
    "logit_lens",
    "logit_margin",
    "patch",
    "readable_vs_causal",
    "resolve_answer",
    "setup_notebook",
    "ReferenceChecksumError",
    "ReferenceFormatError",
    "ReferenceMissingFileError",
    "ReferenceModelMismatchError",
    "ReferenceOverwriteError",
    "ReferenceShapeError",
    "ReferenceTokenizerMismatchError",
    "ReferenceTruncatedError",
    "ReferenceVersionError",
    "TraceReferenceError",
    "ReferenceConflictError",
    "ReferenceContentError",
    "ReferenceLeftoverWarning",
    "ReferenceWriteError",
    "load_reference",
    "RouteAgreement",
    "Routes",
    "routes",
    "Study",
    "StudyFolderError",
    "StudyMismatchError",
    "StudySpecError",
    "StudyVersionWarning",
    "arithmetic_items",
    "load_study",
    "parse_injection",
    "read_items",
    "study",
    "trace",
]
