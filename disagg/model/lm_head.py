"""The output projection, split from the model's body: full logits when a row needs them, and the exact greedy
token of a row at a fraction of their cost.

A greedy step only needs argmax(h @ W^T), and the vocabulary projection is the largest matmul of a small model's
decode step (768 x 50257 for distilgpt2: ~40% of a batch-32 step in float32). `ExactGreedyHead` screens the whole
vocabulary with one bfloat16 matmul (several times faster where the CPU has AVX512-BF16 or AMX), keeps every token
whose bfloat16 score is within a proven error bound of the best, and scores only those in float32. The token it
returns is the float32 argmax, not an approximation of it: a token left out is one whose float32 logit is provably
below another's. (Ties within float32 rounding can break either way, as they already do between batch shapes.)

The bound, for a row h and vocabulary row w (u = 2^-8, bfloat16's unit roundoff; n = hidden size):
  |h.w - bf16(h).bf16(w)| <= (2u + u^2) sum|h_i||w_i| <= (2u + u^2) ||h|| ||w||   (inputs rounded)
  plus n 2^-24 (1 + u)^2 ||h|| ||w|| for each float32 accumulation (the screen's and the float32 logit's own),
  plus u |score| for the screen's output rounded to bfloat16, plus a tiny absolute term for flushed subnormals.
A first cut uses one bound per row (its largest vocabulary norm and score), the survivors their own.
"""

from __future__ import annotations

import functools
import pathlib

import torch
from transformers import PreTrainedModel

from disagg.config import GREEDY_SCREENS
from disagg.model.native_weights import can_pack

_U = 2.0**-8  # bfloat16 unit roundoff (8 significant bits, round to nearest)
_F32 = 2.0**-24  # float32 unit roundoff
_ABSOLUTE = 1e-6  # for subnormals a bfloat16 dot-product instruction may flush to zero (far below any logit gap)
# Models whose logits are exactly lm_head(last hidden state): no bias, scaling or soft-capping after it.
_PLAIN_HEADS = frozenset({"GPT2LMHeadModel", "LlamaForCausalLM"})


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 (Linux's /proc/cpuinfo flags): where a bfloat16 matmul beats a float32 one."""
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _packed(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` reordered for oneDNN's matmul, on a CPU that prepacks its dtype; else None."""
    if weight.device.type != "cpu" or not can_pack(weight.dtype):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def splittable(model: PreTrainedModel) -> bool:
    """Whether the model's logits are its output embeddings applied to its body's last hidden state, nothing more."""
    head = model.get_output_embeddings()
    return type(model).__name__ in _PLAIN_HEADS and isinstance(head, torch.nn.Linear) and head.bias is None


def body_hidden(model: PreTrainedModel, **inputs: object) -> torch.Tensor:
    """The body's last hidden state [rows, hidden] at each row's last position (the head's input)."""
    out = model.base_model(**inputs)
    return out.last_hidden_state[:, -1, :]


class LmHead:
    """Float32 logits of the model's head; `greedy` picks the argmax of the rows asked, exactly."""

    def __init__(self, model: PreTrainedModel):
        head = model.get_output_embeddings()
        assert isinstance(head, torch.nn.Linear), "a head that splittable() accepted"
        self.weight: torch.Tensor = head.weight.detach()  # [vocab, hidden], the model's own tensor

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.weight).float()

    def greedy(self, hidden: torch.Tensor) -> list[int]:
        return torch.argmax(self.logits(hidden), dim=-1).tolist()


class ExactGreedyHead(LmHead):
    """Greedy tokens from a bfloat16 screen of the vocabulary and float32 scores of the few tokens it keeps."""

    def __init__(self, model: PreTrainedModel):
        super().__init__(model)
        weight = self.weight
        screen = weight.to(torch.bfloat16)  # one copy (vocab x hidden x 2 bytes), made once
        # prepacked for oneDNN where the CPU can (the same bf16 products, computed faster), else kept plain
        self._packed_screen = _packed(screen)
        self._screen = screen if self._packed_screen is None else None
        # Row norms rounded up (float64, then a relative margin far above float32's rounding).
        self.row_norms = (weight.double().norm(dim=1) * (1 + 1e-5)).float()
        self.max_row_norm = float(self.row_norms.max())
        hidden_size = weight.shape[1]
        self.product_error = 2 * _U + _U * _U + 2 * hidden_size * _F32 * (1 + _U) ** 2 * 1.01
        self.screened_tokens = 0  # tokens scored in float32 since start (how well the screen prunes)
        self.rows = 0

    def screen_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """The bfloat16 screen's scores of every token [rows, vocab] (bf16 products, float32 accumulation)."""
        x = hidden.to(torch.bfloat16)
        if self._packed_screen is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed_screen, None, "none", [], "")
        assert self._screen is not None
        return torch.nn.functional.linear(x, self._screen)

    @torch.inference_mode()
    def greedy(self, hidden: torch.Tensor) -> list[int]:
        hidden = hidden.float()
        norms = hidden.double().norm(dim=1) * (1 + 1e-5)
        if not torch.isfinite(norms).all():  # NaN/inf in: the plain argmax says what it says
            return super().greedy(hidden)
        scores = self.screen_scores(hidden)  # [rows, vocab] bf16
        low, high = scores.amin(dim=1).double(), scores.amax(dim=1).double()  # (2 reductions beat one aminmax)
        if not (torch.isfinite(low).all() and torch.isfinite(high).all()):  # overflowed in bfloat16
            return super().greedy(hidden)
        biggest = torch.maximum(low.abs(), high.abs())
        # One bound for the whole row (its largest row norm and score): a cheap first cut
        row_bound = self.product_error * norms * self.max_row_norm + _U * 1.01 * biggest + _ABSOLUTE
        floor = high - 2 * row_bound
        floor = floor - floor.abs() * 2.0**-7 - 1e-30  # rounded down to bf16 below, never up
        rows, tokens = torch.nonzero(scores >= floor.to(torch.bfloat16)[:, None], as_tuple=True)
        # Per-token bounds on the survivors; a token stays if it can reach the best lower bound of its row
        approx = scores[rows, tokens].double()
        bound = self.product_error * norms[rows] * self.row_norms[tokens].double() + _U * 1.01 * approx.abs()
        bound = bound + _ABSOLUTE
        best_low = torch.full_like(norms, -torch.inf).scatter_reduce(0, rows, approx - bound, "amax")
        keep = approx + bound >= best_low[rows]
        rows, tokens = rows[keep], tokens[keep]
        exact = (hidden[rows] * self.weight[tokens]).sum(dim=1)  # float32 logits of the survivors
        best = torch.full_like(norms, -torch.inf, dtype=torch.float32).scatter_reduce(0, rows, exact, "amax")
        at_best = exact == best[rows]
        vocab = self.weight.shape[0]
        first = torch.full((hidden.shape[0],), vocab, dtype=torch.long, device=hidden.device).scatter_reduce(
            0, rows[at_best], tokens[at_best], "amin"
        )
        self.screened_tokens += int(rows.numel())
        self.rows += hidden.shape[0]
        return first.tolist()


def fast_bf16(device: torch.device) -> bool:
    """Whether "auto" screens on `device`: a CPU whose bfloat16 matmul is the fast one. (On a GPU the screen is
    "bf16" by choice: it has not been measured on one yet.)"""
    return device.type == "cpu" and cpu_has_fast_bf16()


def greedy_head(model: PreTrainedModel, screen: str = "auto") -> LmHead | None:
    """The head a decode engine picks tokens with, or None for the model's own forward pass (full logits).

    `screen`: "bf16" screens greedy rows' vocabulary in bfloat16 (exact, see the module docstring); "auto" does so
    on a CPU where bfloat16 is the fast matmul; "off" keeps float32 logits for every row. A model that is not float32
    (nothing cheaper to screen with) or whose head cannot be split from its body keeps its own forward pass.
    """
    if screen not in GREEDY_SCREENS:
        raise ValueError(f"greedy screen must be one of {GREEDY_SCREENS}, got {screen!r}")
    if screen == "off" or not splittable(model):
        return None
    weight = LmHead(model).weight
    if weight.dtype != torch.float32 or (screen == "auto" and not fast_bf16(weight.device)):
        return None
    return ExactGreedyHead(model)
