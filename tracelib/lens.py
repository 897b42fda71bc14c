"""When does the answer become readable? Two lenses over the residual stream, labelled apart.

- The **standard logit lens** reads each accumulated residual through the *real* final norm, with
  statistics recomputed from that residual (TransformerLens's `logit_lens`, the #1076 fix). It
  asks: "if the model stopped here, what would it predict?"
- The **cached-scale DLA lens** divides each accumulated residual by the *final* position's cached
  norm scale instead (`accumulated_resid` + `logit_attrs`). It is linear, so its steps add up to
  direct logit attribution, and its last entry equals the model's logit exactly.

They agree at the last entry and differ before it whenever the residual's norm grows with depth (it
nearly always does): early residuals are small, so the standard lens scales them up to the final
norm's size while the DLA lens keeps them at their true, small size. The standard lens is the
right tool for "what would be predicted"; the DLA lens for "how much has been written so far".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tracelib import plotting
from tracelib.formats import LENS_NAMES, READABLE_PROB, check_k, fmt_value, shown_entry, unit_label
from tracelib.identity import ModelGoneError, ModelRef, model_from  # noqa: F401 - ModelGoneError re-exported

# The lazy readout unembeds at most this many (row, entry) residuals at once (5 rows of Qwen2.5's 49
# entries), a group of W_U's columns at a time whose logits take about `_GROUP_BYTES` per lens, so
# the full `[entry, vocab]` logits (30 MB a row on Qwen2.5) are never held. Within a group it
# multiplies `_MATMUL_COLUMNS` columns at a time: a narrow matmul's operands stay in a core's cache,
# which makes it faster than one wide one (by 10-20% on an AMD EPYC).
_READOUT_RESIDUALS = 256
_GROUP_BYTES = 8 * 2**20
_MATMUL_COLUMNS = 2048
# `readable_from` unembeds this many entries first, backwards from the last, then doubles (`_readable_tail`).
_TAIL_ENTRIES = 8
# The fewest W_U columns the eager readout unembeds at once (see `_readout`).
_MIN_COLUMNS = 64


class _Joint:
    """What both lazy lenses of one batch need to compute `prob` and `rank`, shared so that one
    full-vocabulary matmul per entry serves both.

    Before `b_U`, the two lenses' logits at an entry differ only by a positive scale: the standard
    lens divides the (centred) residual by its own norm's scale, the DLA lens by the final position's
    cached scale. So `normalised` holds the DLA lens's residuals and `scale` the standard lens's factor
    on them, `[entry, row]`; the residuals live on the CPU, and the model is held weakly, so a trace
    never keeps a model alive.
    """

    def __init__(self, model, normalised: Tensor, scale: Tensor, targets: Tensor, device) -> None:
        self.model = ModelRef(model)
        self.normalised = normalised.detach().cpu()
        self.scale = scale.detach().cpu()
        self.targets = targets.detach().cpu()
        self.device = device
        n_entry, n_row = self.normalised.shape[:2]
        # Both lenses' (prob, rank), filled an entry at a time as they are computed (`fill`).
        self.known = torch.zeros(n_entry, dtype=torch.bool)
        self.stats: dict[str, tuple[Tensor, Tensor]] = {
            kind: (
                torch.full((n_entry, n_row), float("nan"), dtype=self.normalised.dtype),
                torch.zeros(n_entry, n_row, dtype=torch.long),
            )
            for kind in ("standard", "dla")
        }
        self.joined: dict[tuple, _Joint] = {}

    def fill(self, model, entries) -> None:
        """Compute both lenses' (prob, rank) at `entries` (indices), every row, where not yet computed."""
        todo = [e for e in entries if not self.known[e]]
        if not todo:
            return
        at = torch.tensor(todo)
        stats = _full_readout(model, self.normalised[at], self.scale[at], self.targets, self.device)
        for kind, (prob, rank) in stats.items():
            self.stats[kind][0][at], self.stats[kind][1][at] = prob, rank
        self.known[at] = True

    def result(self, model, kind: str) -> tuple[Tensor, Tensor]:
        """(prob, rank) of lens `kind` at every entry, computing what `fill` has not yet."""
        self.fill(model, range(len(self.known)))
        return self.stats.pop(kind)

    @staticmethod
    def join(parts: list[_Joint]) -> _Joint:
        """The joint of batches `parts`, row after row; both lenses' joins get the same one."""
        key = tuple(id(p) for p in parts)
        if key not in parts[0].joined:
            model = parts[0].model()
            parts[0].joined[key] = _Joint(
                model,
                torch.cat([p.normalised for p in parts], dim=1),
                torch.cat([p.scale for p in parts], dim=1),
                torch.cat([p.targets for p in parts]),
                parts[0].device,
            )
        return parts[0].joined[key]


class _Pending:
    """A lazy `LensCurve`'s link to the batch's shared `_Joint`, and which lens it is."""

    def __init__(self, joint: _Joint, kind: str) -> None:
        self.joint, self.kind = joint, kind
        self.model = joint.model


class _LazyStat:
    """A dataclass field computed on first read (see `LensCurve`); its default is None."""

    def __set_name__(self, owner, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:
            return None  # the dataclass field's default
        value = obj.__dict__.get(self.slot)
        if value is None:
            obj._materialise(None)
            value = obj.__dict__[self.slot]
        return value

    def __set__(self, obj, value) -> None:
        # A frozen dataclass's __init__ goes through object.__setattr__, which calls this.
        obj.__dict__[self.slot] = value


@dataclass(frozen=True)
class LensCurve:
    """One lens along depth: `[entry, row]` metrics for every accumulated-residual entry.

    Entry labels follow TransformerLens: `"3_pre"` is the residual entering block 3, `"3_mid"` the
    one after block 3's attention, `"final_post"` the one after the last block.

    `prob` and `rank` need the whole vocabulary's logits at every entry, which costs more than the
    forward pass on a large vocabulary. A trace therefore computes them on first read, every row's
    and both lenses' at once, and keeps them; `logit` and `logit_diff` are computed at once.
    `readable_from` (which `summary()` reads) computes only the entries it needs: from the last one
    back to where the answer stops being readable, often a few entries of 49. Until then
    the curve holds a weak reference to the model: read them (or call `materialise(model)`) while
    the model is alive, or `ModelGoneError` says so. Passing tensors for them, as
    `LensCurve(kind, labels, logit, logit_diff, prob, rank)`, makes an ordinary eager curve.
    """

    kind: str
    labels: list[str]
    logit: Float[Tensor, "entry row"]
    logit_diff: Float[Tensor, "entry row"]
    prob: Float[Tensor, "entry row"] = _LazyStat()
    rank: Int[Tensor, "entry row"] = _LazyStat()

    def __post_init__(self) -> None:
        shape = (len(self.labels), self.logit.shape[-1])
        lazy = "_pending" in self.__dict__
        for name in ("logit", "logit_diff", "prob", "rank"):
            value = self.__dict__["_" + name] if name in ("prob", "rank") else getattr(self, name)
            if value is None and lazy:
                continue
            if value is None:
                raise ValueError(f"LensCurve.{name} is missing: pass a tensor, [entry, row] = {shape}")
            if tuple(value.shape) != shape:
                raise ValueError(f"LensCurve.{name} must be [entry, row] = {shape}, got {tuple(value.shape)}")
        if self.kind not in LENS_NAMES:
            raise ValueError(f"kind must be one of {list(LENS_NAMES)}, got {self.kind!r}")

    @classmethod
    def lazy(cls, kind: str, labels: list[str], logit: Tensor, logit_diff: Tensor, pending: _Pending) -> LensCurve:
        """A curve whose `prob` and `rank` are computed from `pending` on first read."""
        curve = cls.__new__(cls)
        object.__setattr__(curve, "_pending", pending)
        curve.__init__(kind, labels, logit, logit_diff)
        return curve

    @property
    def is_materialised(self) -> bool:
        """Whether `prob` and `rank` are computed (no model needed any more)."""
        return self.__dict__.get("_prob") is not None and self.__dict__.get("_rank") is not None

    def materialise(self, model=None) -> LensCurve:
        """Compute `prob` and `rank` now, with `model` (default: the model that traced), and keep them.

        Returns:
            This curve, which then needs no model.
        """
        if not self.is_materialised:
            self._materialise(model)
        return self

    def __repr__(self) -> str:
        # Short, and never computes the lazy fields (nor fails once the model is gone).
        return f"LensCurve({self.kind}, {len(self.labels)} entries, {self.logit.shape[-1]} row(s))"

    @classmethod
    def join_rows(cls, curves: list[LensCurve]) -> LensCurve:
        """One curve over the rows of `curves`, in order (see `tl.trace`'s `batch_size`).

        Curves not yet computed stay lazy, so joining costs no unembedding.
        """
        first = curves[0]
        if any(c.kind != first.kind or c.labels != first.labels for c in curves):
            raise ValueError("only curves of the same lens and entries can be joined")
        logit = torch.cat([c.logit for c in curves], dim=1)
        diff = torch.cat([c.logit_diff for c in curves], dim=1)
        pending = [c.__dict__.get("_pending") for c in curves]
        if all(p is not None for p in pending) and all(p.model() is pending[0].model() for p in pending):
            if pending[0].model() is not None:
                joined = _Pending(_Joint.join([p.joint for p in pending]), first.kind)
                return cls.lazy(first.kind, list(first.labels), logit, diff, joined)
        prob = torch.cat([c.prob for c in curves], dim=1)
        rank = torch.cat([c.rank for c in curves], dim=1)
        return cls(first.kind, list(first.labels), logit, diff, prob, rank)

    def _model(self, pending: _Pending, model):
        if model is not None:
            return model
        return model_from(
            pending.model,
            f"The {LENS_NAMES[self.kind]}'s prob and rank are computed on first read, from the model",
            "Read .prob or .rank (or call trace.lens.materialise(model)) while the model is alive; or pass "
            "a model now: trace.lens.materialise(model).",
        )

    def _materialise(self, model) -> None:
        pending = self.__dict__.get("_pending")
        if pending is None:
            raise ValueError("LensCurve.prob and .rank were never given")
        prob, rank = pending.joint.result(self._model(pending, model), self.kind)
        self.__dict__["_prob"], self.__dict__["_rank"] = prob, rank
        del self.__dict__["_pending"]

    def readable(self, row: int = 0) -> list[bool]:
        """Per entry: whether the lens gives the answer more than half of the probability there.

        That is what "readable" means everywhere in tracelib (`formats.READABLE_PROB`): the answer
        is the top prediction and more likely than every other token together. A guess among the
        digits before the model has seen the operands (p about 0.1 to 0.3 each) does not count.
        """
        return (self.prob[:, row] > READABLE_PROB).tolist()

    def readable_from(self, row: int = 0) -> str | None:
        """The first entry from which the answer is readable (p > 0.5) at every later entry; None if
        it is not readable at the last entry."""
        pending = self.__dict__.get("_pending")
        if pending is None or self.is_materialised:
            ok = self.readable(row)
        else:
            ok = self._readable_tail(pending, row)
        if not ok[-1]:
            return None
        first = len(ok) - 1
        while first > 0 and ok[first - 1]:
            first -= 1
        return self.labels[first]

    def _readable_tail(self, pending: _Pending, row: int) -> list[bool]:
        """`readable(row)` computed backwards from the last entry only as far as the answer stays
        readable, `_TAIL_ENTRIES` entries first, then twice as many each time (each step reads all of
        W_U once, so few steps are cheaper than many small ones); the entries not computed read False.

        Where the answer becomes readable late (or never), this unembeds a few entries instead of
        all of them; the rest wait for the first read of `prob` or `rank`.
        """
        joint, n_entry = pending.joint, len(self.labels)
        prob = joint.stats[self.kind][0]
        ok = [False] * n_entry
        stop, size = n_entry, _TAIL_ENTRIES
        while stop > 0:
            start = max(0, stop - size)
            joint.fill(self._model(pending, None), range(start, stop))
            for e in range(stop - 1, start - 1, -1):
                if not bool(prob[e, row] > READABLE_PROB):
                    return ok
                ok[e] = True
            stop, size = start, 2 * size
        return ok


@dataclass(frozen=True)
class LogitLens:
    """Both lenses on the same rows. Per layer and per sublayer (`*_mid` entries).

    `answer_strs` and `distractor_strs` (per row) name what the logit difference compares, for
    figure titles; references saved before format 3 have none.
    """

    row_labels: list[str]
    standard: LensCurve
    dla: LensCurve
    answer_strs: list[str] = field(default_factory=list)
    distractor_strs: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.standard.labels != self.dla.labels:
            raise ValueError("both lenses must share their entry labels")
        if self.standard.logit.shape[1] != len(self.row_labels):
            raise ValueError(f"lens curves need {len(self.row_labels)} rows")

    @property
    def labels(self) -> list[str]:
        return self.standard.labels

    def materialise(self, model=None) -> LogitLens:
        """Compute both lenses' `prob` and `rank` now (see `LensCurve`), so no model is needed later.

        Returns:
            This lens.
        """
        self.standard.materialise(model)
        self.dla.materialise(model)
        return self

    def per_layer(self) -> list[int]:
        """Indices of the whole-layer entries (`*_pre` and `final_post`), dropping sublayers."""
        return [i for i, label in enumerate(self.labels) if not label.endswith("_mid")]

    def readable_from(self, row: int = 0, lens: str = "standard") -> str | None:
        """First entry from which the answer is readable (p > 0.5) and stays so, by the chosen lens."""
        return getattr(self, lens).readable_from(row)

    def to_frame(self) -> pd.DataFrame:
        """Long form: one line per (lens, row, entry)."""
        records = []
        for curve in (self.standard, self.dla):
            for r, row_label in enumerate(self.row_labels):
                for e, label in enumerate(curve.labels):
                    records.append(
                        dict(
                            lens=curve.kind,
                            row=r,
                            label=row_label,
                            entry=unit_label(label),
                            index=e,
                            logit=curve.logit[e, r].item(),
                            logit_diff=curve.logit_diff[e, r].item(),
                            prob=curve.prob[e, r].item(),
                            rank=int(curve.rank[e, r]),
                        )
                    )
        return pd.DataFrame.from_records(records)

    def top(self, k: int = 5, row: int = 0, lens: str = "standard") -> pd.DataFrame:
        """The k sublayers that moved the answer's logit difference most, by absolute size, signs kept."""
        k = check_k(k)
        curve = getattr(self, lens)
        steps = curve.logit_diff[1:, row] - curve.logit_diff[:-1, row]
        order = steps.abs().argsort(descending=True)[:k]
        return pd.DataFrame(
            {
                "from": [unit_label(curve.labels[i]) for i in order.tolist()],
                "to": [unit_label(curve.labels[i + 1]) for i in order.tolist()],
                "change in logit diff": steps[order].tolist(),
            }
        )

    def plot(self, row: int = 0, metric: str = "logit_diff", **layout):
        """Both lenses along depth for one row; `metric` is logit, logit_diff, prob or rank."""

        return plotting.lens_lines(self, row, metric, **layout)

    def __repr__(self) -> str:
        lines = [f"LogitLens({len(self.labels)} entries, {len(self.row_labels)} row(s))"]
        for r, label in enumerate(self.row_labels[:5]):
            lines.append(
                f"  {label}: readable from {shown_entry(self.standard.readable_from(r))} (standard), "
                f"{shown_entry(self.dla.readable_from(r))} (dla); "
                f"final logit diff {fmt_value(self.standard.logit_diff[-1, r])}"
            )
        return "\n".join(lines)


def _unembed(model, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return model.W_U.to(dtype), model.b_U.to(dtype)


def _readout(
    normalised: Float[Tensor, "entry row d_model"],
    W_U: Float[Tensor, "d_model vocab"],
    b_U: Float[Tensor, " vocab"],
    targets: Tensor,
    distractors: list[list[int]],
) -> tuple[Tensor, Tensor]:
    """Answer logit and logit diff of normalised residuals, from only the columns of W_U they need.

    Every row is unembedded against the union of all rows' answer and distractor columns, in one
    matmul. That union is padded to at least `_MIN_COLUMNS` columns: BLAS kernels sum a narrow
    matmul in another order than a wide one, and at this width the values take the same kernel as
    the full `[entry, vocab]` logits. They equal those columns to float rounding (tests/test_lazy_lens.py
    checks it); bit for bit only where the same BLAS kernel runs, which depends on the CPU.
    """
    wanted = sorted({int(t) for t in targets.tolist()} | {d for ds in distractors for d in ds})
    column = {token: i for i, token in enumerate(wanted)}
    cols = torch.tensor(wanted + [wanted[0]] * max(0, _MIN_COLUMNS - len(wanted)), device=W_U.device)
    logits = normalised.transpose(0, 1) @ W_U[:, cols] + b_U[cols]  # [row, entry, column]
    logit, diff = [], []
    for r in range(normalised.shape[1]):
        answer = logits[r, :, column[int(targets[r])]]
        logit.append(answer)
        diff.append(answer - logits[r][:, [column[d] for d in distractors[r]]].mean(-1))
    return tuple(torch.stack(x, dim=1).cpu() for x in (logit, diff))


def _full_readout(
    model, normalised: Tensor, scale: Tensor, targets: Tensor, device
) -> dict[str, tuple[Tensor, Tensor]]:
    """Both lenses' answer probability and rank among the whole vocabulary, `[entry, row]` each.

    `normalised @ W_U` is the DLA lens's logits before `b_U`, and `scale` times it the standard
    lens's (see `_Joint`): one matmul serves both. Rows are unembedded a few at a time, on the device
    that traced, one group of W_U's columns at a time (`_vocab_stats`).
    """
    n_entry, n_row, d_model = normalised.shape
    W_U, b_U = _unembed(model, normalised.dtype)
    W_U, b_U = W_U.to(device), b_U.to(device)
    step = max(1, _READOUT_RESIDUALS // max(n_entry, 1))
    out: dict[str, tuple[list, list]] = {"standard": ([], []), "dla": ([], [])}
    with torch.no_grad():
        bias = b_U if bool(b_U.any()) else None  # None: one count ranks both lenses (`_vocab_stats`)
        for start in range(0, n_row, step):
            block = normalised[:, start : start + step].to(device).transpose(0, 1)  # [rows, entry, d_model]
            rows = block.shape[0]
            factor = scale[:, start : start + step].to(device).T.reshape(-1, 1)  # [(row entry), 1]
            t = targets[start : start + step].to(device).repeat_interleave(n_entry)
            stats = _vocab_stats(block.reshape(-1, d_model), factor, t, W_U, bias)
            for kind, (prob, rank) in stats.items():
                out[kind][0].append(prob.reshape(rows, n_entry).T.cpu())
                out[kind][1].append(rank.reshape(rows, n_entry).T.cpu())
    return {kind: (torch.cat(prob, dim=1), torch.cat(rank, dim=1)) for kind, (prob, rank) in out.items()}


def _vocab_stats(
    x: Float[Tensor, "n d_model"],
    factor: Float[Tensor, "n 1"],
    targets: Int[Tensor, " n"],
    W_U: Float[Tensor, "d_model vocab"],
    b_U: Float[Tensor, " vocab"] | None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Both lenses' (prob, rank) of `targets` for residuals `x`, one group of W_U's columns at a time.

    Each group's logits give a partial logsumexp and a count of tokens above the answer; the partial
    logsumexps combine into the whole vocabulary's. A count compares against the answer's logit read
    from the very tensor it counts in (another matmul may round it otherwise, and the answer would
    outrank itself), so the groups that hold answers are unembedded, and counted, first.
    """
    n, vocab = x.shape[0], W_U.shape[1]
    width = max(1, _GROUP_BYTES // (n * x.element_size() * _MATMUL_COLUMNS)) * _MATMUL_COLUMNS

    def logits(g: int) -> dict[str, Tensor]:
        start, stop = g * width, min((g + 1) * width, vocab)
        product = x.new_empty(n, stop - start)
        for lo in range(start, stop, _MATMUL_COLUMNS):
            hi = min(lo + _MATMUL_COLUMNS, stop)
            torch.mm(x, W_U[:, lo:hi], out=product[:, lo - start : hi - start])
        if b_U is None:
            return {"dla": product, "standard": product * factor}
        b = b_U[start:stop]
        return {"dla": product + b, "standard": torch.addcmul(b, product, factor)}

    group_of = targets // width
    first = {g: logits(g) for g in group_of.unique().tolist()}
    answer = {kind: x.new_empty(n) for kind in ("dla", "standard")}
    for g, values in first.items():
        at = (group_of == g).nonzero()[:, 0]
        for kind, v in values.items():
            answer[kind][at] = v[at, targets[at] - g * width]
    # Without b_U the standard lens's logits are the DLA lens's times a positive factor per residual:
    # the same order, so one count ranks the answer in both (rounding the product could only add ties).
    counted = ("dla",) if b_U is None else ("dla", "standard")
    lse: dict[str, list[Tensor]] = {"dla": [], "standard": []}
    count = {kind: torch.zeros(n, dtype=torch.int32, device=x.device) for kind in counted}
    for g in [*first, *(g for g in range(-(-vocab // width)) if g not in first)]:
        values = first.pop(g) if g in first else logits(g)
        for kind, v in values.items():
            lse[kind].append(v.logsumexp(-1))
            if kind in count:
                # int32: summing bools to int64 takes a much slower path.
                count[kind] += (v > answer[kind][:, None]).sum(-1, dtype=torch.int32)
        del values
    rank = {"dla": count["dla"], "standard": count.get("standard", count["dla"])}
    return {
        kind: ((answer[kind] - torch.stack(lse[kind], -1).logsumexp(-1)).exp(), rank[kind].long())
        for kind in ("standard", "dla")
    }


def compute_lens(
    model,
    cache,
    targets: Tensor,
    distractors: list[list[int]],
    row_labels: list[str],
    answer_strs: list[str] | None = None,
    distractor_strs: list[list[str]] | None = None,
) -> LogitLens:
    """Both lenses from a final-position cache (position axis of length 1); `prob` and `rank` lazy."""
    stack, labels = cache.accumulated_resid(
        layer=None, incl_mid=True, apply_ln=False, pos_slice=None, return_labels=True
    )  # [entry, row, 1, d_model]
    dtype = torch.float64 if stack.dtype == torch.float64 else torch.float32
    W_U, b_U = _unembed(model, dtype)
    normalised = {
        kind: cache.apply_ln_to_stack(stack, layer=None, recompute_ln=recompute)[:, :, 0].to(dtype)
        for kind, recompute in (("standard", True), ("dla", False))
    }
    # The standard lens's residuals are the DLA lens's times a positive factor per entry and row.
    dla = normalised["dla"]
    norm = dla.square().sum(-1)
    scale = torch.where(norm > 0, (normalised["standard"] * dla).sum(-1) / norm.clamp_min(torch.finfo(dtype).tiny), 0)
    joint = _Joint(model, dla, scale, targets, dla.device)
    curves = {}
    for kind in ("standard", "dla"):
        logit, diff = _readout(normalised[kind], W_U, b_U, targets, distractors)
        curves[kind] = LensCurve.lazy(kind, list(labels), logit, diff, _Pending(joint, kind))
    return LogitLens(
        list(row_labels), curves["standard"], curves["dla"], list(answer_strs or []), list(distractor_strs or [])
    )
