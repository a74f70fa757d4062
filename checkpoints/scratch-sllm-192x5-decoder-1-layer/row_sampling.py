"""Each row its own sampling settings and random stream: what continuous batching needs to serve mixed traffic.

A request's `SamplingParams` (temperature, 0 = greedy; top_k, top_p, min_p; repetition, frequency and presence
penalties; a seed) become one row of `RowSampling`, tensors [B] that the sentence loop applies to its [B, V+1]
class logits (the sentence end last) in one batched pass. Sampled rows draw by the exponential race, each from
its own `torch.Generator` (probabilities divided by Exp(1) noise, then argmax: a sample of the distribution), so
a seeded request writes the same text whatever rows run beside it; greedy rows take the argmax. As in vLLM v1
(`vllm/v1/sample/metadata.py`, `ops/topk_topp_sampler.py`), written here for the sentence loop.
"""

import dataclasses
import math
import random
from collections.abc import Callable

import torch
from transformers import GenerationConfig

# Tokens sorted first when truncating a row's distribution (top_k, top_p, min_p keep a head of it): at most a few
# hundred of the 8,192 carry the mass top_p keeps after a few sentences; a row that keeps all of them is sorted whole.
TRUNCATION_CANDIDATES = 256

# Generation-config fields a request may set per row (the rest of a request's config is checked by the manager).
ROW_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings. temperature 0: greedy; top_k 0, top_p 1, min_p 0: off; penalties: off at
    1 (repetition, over prompt and new tokens, as Transformers') and 0 (frequency and presence, over new tokens,
    as OpenAI's); seed None: a fresh random stream."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        problems = [
            (self.temperature >= 0 and math.isfinite(self.temperature), "temperature must be >= 0"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.seed is None or isinstance(self.seed, int), "seed must be an integer"),
        ]
        if refused := [message for ok, message in problems if not ok]:
            raise ValueError(f"sampling settings refused: {'; '.join(refused)} ({self})")

    @property
    def sampled(self) -> bool:
        return self.temperature > 0

    @classmethod
    def from_generation_config(cls, config: GenerationConfig, **overrides) -> "SamplingParams":
        """The settings a generation config asks for (fields it leaves unset: off), then `overrides`."""
        fields = {
            "temperature": (config.temperature if config.temperature is not None else 1.0) if config.do_sample else 0.0,
            "top_k": config.top_k or 0,
            "top_p": config.top_p if config.top_p is not None else 1.0,
            "min_p": config.min_p or 0.0,
            "repetition_penalty": config.repetition_penalty or 1.0,
        }
        return cls(**(fields | overrides))


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A random stream of its own: seeded (any integer, taken modulo 2**64), or from fresh entropy."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % 2**64 if seed is not None else random.SystemRandom().getrandbits(63))
    return generator


class RowSampling:
    """The rows' sampling settings as tensors [B] and their generators, applied to class logits [B, V+1]."""

    def __init__(
        self, params: list[SamplingParams], device: torch.device, generators: list[torch.Generator | None] | None = None
    ):
        """`generators`: the rows' random streams where they have one already (a row read again), else new ones."""
        self.params = list(params)
        given = generators or [None] * len(self.params)
        self.generators = [(g or new_generator(p.seed, device)) if p.sampled else None for p, g in zip(self.params, given)]
        self._tensors(device)

    def _tensors(self, device: torch.device) -> None:
        """The settings as [B] tensors, and which passes any row needs (host flags: no pass for none)."""
        def column(name: str, dtype=torch.float32) -> torch.Tensor:
            return torch.tensor([getattr(p, name) for p in self.params], dtype=dtype, device=device)

        self.temperature, self.top_p, self.min_p = column("temperature"), column("top_p"), column("min_p")
        self.top_k = column("top_k", torch.long)
        self.repetition, self.frequency = column("repetition_penalty"), column("frequency_penalty")
        self.presence = column("presence_penalty")
        self.sampled = self.temperature > 0  # [B]
        self.any_sampled = any(p.sampled for p in self.params)
        truncated = [row for row, p in enumerate(self.params) if p.sampled and (p.top_k or p.top_p < 1 or p.min_p)]
        self.any_truncated = bool(truncated)
        self.truncated_rows = torch.tensor(truncated, dtype=torch.long, device=device)  # [R]
        self.candidates = max([TRUNCATION_CANDIDATES] + [self.params[row].top_k for row in truncated])
        self.any_repetition = any(p.repetition_penalty != 1 for p in self.params)
        self.any_counted = any(p.frequency_penalty or p.presence_penalty for p in self.params)

    def join(self, other: "RowSampling") -> None:
        """Append other's rows."""
        self.params += other.params
        self.generators += other.generators
        self._tensors(self.temperature.device)

    def keep(self, rows: list[int]) -> None:
        """Keep only rows `rows`, in that order."""
        self.params = [self.params[row] for row in rows]
        self.generators = [self.generators[row] for row in rows]
        self._tensors(self.temperature.device)

    def process(self, logits: torch.Tensor, tokens_so_far: Callable[[], tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """Penalties, temperature and truncation, each row its own: logits [B, V+1] (float32, the last column the
        sentence end, never penalised). `tokens_so_far()` gives the rows' tokens: text [B, T], which columns hold
        prompt and new tokens [B, T], which new ones [B, T]; it is called only where a row has a penalty. Returns
        the processed logits [B, V+1]."""
        vocab = logits.shape[1] - 1
        if self.any_repetition or self.any_counted:
            text, real, new = tokens_so_far()
            counts = torch.zeros_like(logits)  # [B, V+1]: how often each token occurs
            if self.any_repetition:  # Transformers' RepetitionPenaltyLogitsProcessor over prompt and new tokens
                seen = counts.scatter_add(1, text, real.float())[:, :vocab] > 0
                penalty = self.repetition[:, None]
                token_logits = logits[:, :vocab]
                penalised = torch.where(token_logits < 0, token_logits * penalty, token_logits / penalty)
                logits = torch.cat([torch.where(seen, penalised, token_logits), logits[:, vocab:]], 1)
            if self.any_counted:  # OpenAI's frequency and presence penalties over the new tokens
                counts = counts.scatter_add(1, text, new.float())
                counts[:, vocab] = 0
                logits = logits - self.frequency[:, None] * counts - self.presence[:, None] * (counts > 0).float()
        if not self.any_sampled:
            return logits
        logits = torch.where(self.sampled[:, None], logits / self.temperature.clamp(min=1e-5)[:, None], logits)
        if self.any_truncated:
            logits = self.truncate(logits)
        return logits

    def truncate(self, logits: torch.Tensor) -> torch.Tensor:
        """top_k, then top_p, then min_p of the rows that set one (logits [B, V+1]): each criterion keeps a head of
        the row's sorted distribution, so the likeliest `candidates` tokens are sorted first (topk), and the whole
        row only where all of them are kept."""
        rows = self.truncated_rows  # [R]
        sub = logits[rows]  # [R, V+1]
        log_total = sub.logsumexp(-1, keepdim=True)  # [R, 1]: probabilities are of the whole row
        values, order = sub.topk(min(self.candidates, sub.shape[1]), -1)  # [R, K], sorted
        cut = self.cuts(values, log_total, rows)
        if values.shape[1] < sub.shape[1] and not bool(cut[:, -1].all()):  # some row keeps all K: sort it all
            values, order = sub.sort(-1, descending=True)
            cut = self.cuts(values, log_total, rows)
        kept = torch.full_like(sub, -float("inf")).scatter(1, order, values.masked_fill(cut, -float("inf")))
        return logits.index_copy(0, rows, kept)

    def cuts(self, values: torch.Tensor, log_total: torch.Tensor, rows: torch.LongTensor) -> torch.BoolTensor:
        """Which of the rows' sorted logits [R, K] (the likeliest first) top_k, top_p and min_p cut: [R, K]."""
        top_k, top_p, min_p = self.top_k[rows, None], self.top_p[rows, None], self.min_p[rows, None]
        rank = torch.arange(values.shape[1], device=values.device)
        probs = (values - log_total).exp()  # [R, K]
        cut = (top_k > 0) & (rank >= top_k)  # top_k
        kept = probs.masked_fill(cut, 0.0)
        mass = torch.where(top_k > 0, kept.sum(-1, keepdim=True), 1.0)  # top_p renormalises after top_k (K >= top_k)
        cut |= (top_p < 1) & ((kept.cumsum(-1) - kept) >= top_p * mass)  # top_p: the smallest head with that mass
        cut |= probs < min_p * probs[:, :1]  # min_p: relative to the likeliest token
        cut[:, 0] = False  # the likeliest token always stays
        return cut

    def choose(self, logits: torch.Tensor, rows: torch.LongTensor, row_ids: list[int]) -> torch.LongTensor:
        """The class of each row in `rows` [R] (their processed logits [R, V+1]; `row_ids` the same rows on the
        host): argmax for greedy rows, the exponential race for sampled ones, each from its own generator."""
        chosen = logits.argmax(-1)  # [R]
        if not self.any_sampled:
            return chosen
        sampled = [index for index, row in enumerate(row_ids) if self.generators[row] is not None]
        if not sampled:
            return chosen
        probs = logits[sampled].softmax(-1)  # [S, V+1]
        noise = torch.stack([torch.empty_like(probs[0]).exponential_(generator=self.generators[row_ids[index]])
                             for index in sampled])  # fmt: skip
        index = torch.tensor(sampled, device=logits.device)
        return chosen.index_copy(0, index, (probs / noise).argmax(-1))

    def stop_draws(self, stop_logits: torch.Tensor, rows: list[int]) -> torch.BoolTensor:
        """Whether each row's text ends, from the stop head's logits [B, 2]: greedy rows the likelier, and the
        sampled rows among `rows` (the fresh ones, on the host) a draw from their generators."""
        stop = stop_logits[:, 1] > stop_logits[:, 0]  # [B]
        sampled = [row for row in rows if self.generators[row] is not None]
        if not sampled:
            return stop
        index = torch.tensor(sampled, device=stop_logits.device)
        uniform = torch.cat([torch.rand(1, generator=self.generators[row], device=stop_logits.device)
                             for row in sampled])  # fmt: skip
        return stop.index_copy(0, index, uniform < stop_logits[index].float().softmax(-1)[:, 1])
