"""Host-side bookkeeping of ``RolloutEngine``'s scheduler: per-row outputs and stop detection (``Outputs``),
the decode slots (``Slots``), launched steps (``Step``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from grpo.engine.config import SamplingConfig
from grpo.engine.protocol import Decoder
from grpo.sampling import StopStrings


class Outputs:
    """Per-row generated tokens and logprobs (CPU), stop detection and finish reasons."""

    def __init__(self, rows: int, cfg: SamplingConfig, pad_id: int, stop_ids: torch.Tensor, stops: StopStrings):
        self.max_new, self.stop_ids, self.stops = cfg.max_new_tokens, stop_ids, stops
        self.tokens = torch.full((rows, cfg.max_new_tokens), pad_id, dtype=torch.long)
        self.logprobs = torch.zeros(rows, cfg.max_new_tokens)
        self.count = torch.zeros(rows, dtype=torch.long)
        self.finished = torch.zeros(rows, dtype=torch.bool)
        self.reason = [""] * rows
        self.routes: list[torch.Tensor | None] | None = [None] * rows if cfg.record_routing else None

    def add_routes(self, rows: torch.Tensor, positions: torch.Tensor, routes: torch.Tensor) -> None:
        """Routes [m, layers, K] of the tokens at ``positions`` [m] of ``rows`` [m] (finished rows ignored)."""
        for r, p, x in zip(rows.tolist(), positions.tolist(), routes):
            if not self.finished[r]:
                self.routes[r][p] = x

    def add(self, rows: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
        """Append one token to each unfinished row of ``rows`` [m] (CPU tensors); returns done [m] bool,
        True for the rows this token finished (tokens for already finished rows are ignored)."""
        done = torch.zeros(len(rows), dtype=torch.bool)
        live = (~self.finished[rows]).nonzero().flatten()
        rows, tokens, logprobs = rows[live], tokens[live], logprobs[live]
        at = self.count[rows]
        self.tokens[rows, at] = tokens
        self.logprobs[rows, at] = logprobs.float()
        self.count[rows] = at + 1
        stop = torch.isin(tokens, self.stop_ids)
        if self.stops:
            for j in (~stop).nonzero().flatten().tolist():
                stop[j] = self.stops.hit(self.tokens[int(rows[j]), : at[j] + 1].tolist())
        ended = stop | (at + 1 >= self.max_new)
        for j in ended.nonzero().flatten().tolist():
            self.reason[int(rows[j])] = "stop" if stop[j] else "length"
        self.finished[rows[ended]] = True
        done[live[ended]] = True
        return done


    def add_runs(self, rows: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor,
                 count: torch.Tensor) -> torch.Tensor:
        """Append the first count[i] of tokens [m, w] (logprobs [m, w]) to row rows[i], in order: a stop or the
        token limit inside a run finishes the row and the rest of the run is ignored. Returns done [m] as
        ``add``."""
        done = torch.zeros(len(rows), dtype=torch.bool)
        for j in range(tokens.shape[1]):
            live = (count > j).nonzero().flatten()
            done[live] |= self.add(rows[live], tokens[live, j], logprobs[live, j])
        return done


class Slots:
    """Host-side state of a decoder's slots. Active slots are 0..n-1; slot s holds result row ``row[s]``
    with ``pos[s]`` tokens in its cache as of the last step read (the decoder's ``positions`` run ahead by
    the steps launched since); ``slot[r]`` is the slot of active row r (-1 otherwise)."""

    def __init__(self, dec: Decoder, rows: int):
        slots = dec.slots
        self.dec, self.n = dec, 0
        self.row = torch.full((slots,), -1, dtype=torch.long)
        self.pos = torch.zeros(slots, dtype=torch.long)
        self.slot = torch.full((rows,), -1, dtype=torch.long)

    def assign(self, rows: torch.Tensor, lengths: torch.Tensor) -> slice:
        """Give ``rows`` the next free slots (their caches hold ``lengths`` tokens)."""
        new = slice(self.n, self.n + len(rows))
        self.row[new], self.pos[new] = rows, lengths
        self.slot[rows] = torch.arange(new.start, new.stop)
        self.n = new.stop
        return new

    def advance(self, rows: torch.Tensor, count: torch.Tensor) -> None:
        """A read step emitted count[i] tokens for result row rows[i]: their slots' positions move on (rows
        released since are skipped)."""
        at = self.slot[rows]
        live = at >= 0
        self.pos[at[live]] += count[live]

    def release(self, rows: torch.Tensor) -> None:
        """Free the slots of ``rows``; the last active slots move into the holes (cache rows included)."""
        if not len(rows):
            return
        done = torch.zeros(self.n, dtype=torch.bool)
        done[self.slot[rows]] = True
        live = self.n - len(rows)
        holes = done[:live].nonzero().flatten()
        movers = (~done[live:]).nonzero().flatten() + live
        if len(holes):
            src, dst = to_device(movers, self.dec.device), to_device(holes, self.dec.device)
            self.dec.move(src, dst)
            self.row[holes], self.pos[holes] = self.row[movers], self.pos[movers]
            self.slot[self.row[holes]] = holes
        self.slot[rows] = -1
        self.row[live:self.n], self.pos[live:self.n] = -1, 0
        self.n = live


@dataclass
class Step:
    """A launched decode step: result rows [n] of slots 0..n-1 at launch, emitted tokens / logprobs [n, w]
    and their count [n] per slot (w = 1 without speculation) on the host (filled asynchronously on CUDA
    until ``ready``)."""

    rows: torch.Tensor
    tokens: torch.Tensor
    logprobs: torch.Tensor
    count: torch.Tensor
    ready: Optional[torch.cuda.Event]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the queued GPU work (pinned, asynchronous copy;
    the pinned block is not reused before the copy has run)."""
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)

