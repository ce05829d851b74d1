"""Host-side bookkeeping of ``RolloutEngine``'s scheduler: per-row outputs and stop detection (``Outputs``),
the decode slots (``Slots``), launched steps (``Step``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from grpo.engine.config import SamplingConfig
from grpo.engine.protocol import Decoder
from grpo.sampling import StopStrings


class Outputs:
    """Per-row generated tokens and logprobs (CPU), stop detection and finish reasons."""

    def __init__(self, rows: int, cfg: SamplingConfig, pad_id: int, stop_ids: torch.Tensor, stops: StopStrings):
        self.max_new, self.stop_ids, self.stops, self.pad_id = cfg.max_new_tokens, stop_ids, stops, pad_id
        self.tokens = torch.full((rows, cfg.max_new_tokens), pad_id, dtype=torch.long)
        self.logprobs = torch.zeros(rows, cfg.max_new_tokens)
        self.count = torch.zeros(rows, dtype=torch.long)
        self.finished = torch.zeros(rows, dtype=torch.bool)
        self.reason = [""] * rows
        self.routes: list[torch.Tensor | None] | None = [None] * rows if cfg.record_routing else None
        # numpy views of the same memory for ``add_runs``
        self._tokens, self._logprobs, self._count, self._finished, self._stop_ids = (
            t.numpy() for t in (self.tokens, self.logprobs, self.count, self.finished, stop_ids))

    def add_routes(self, rows: torch.Tensor, positions: torch.Tensor, routes: torch.Tensor) -> None:
        """Routes [m, layers, K] of the tokens at ``positions`` [m] of ``rows`` [m] (finished rows ignored)."""
        for r, p, x in zip(rows.tolist(), positions.tolist(), routes):
            if not self.finished[r]:
                self.routes[r][p] = x

    def add(self, rows: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
        """``add_runs`` of one token per row: tokens, logprobs [m]."""
        return self.add_runs(rows, tokens[:, None], logprobs[:, None], torch.ones(len(rows), dtype=torch.long))

    def add_runs(self, rows: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor,
                 count: torch.Tensor) -> torch.Tensor:
        """Append the first count[i] of tokens [m, w] (logprobs [m, w]; CPU tensors) to row rows[i], in order: a
        stop or the token limit inside a run finishes the row and the rest of the run is dropped. Returns done
        [m] bool, True for the rows this call finished (already finished rows are ignored). All rows and
        columns at once, in numpy on views of the tensors (a few microseconds an op, against several for a
        torch op on small CPU tensors); only stop strings are checked token by token."""
        rows, count = rows.numpy(), count.numpy()
        done = np.zeros(len(rows), dtype=bool)
        live = np.flatnonzero(~self._finished[rows])
        rows, count, tokens, logprobs = rows[live], count[live], tokens.numpy()[live], logprobs.float().numpy()[live]
        start, col = self._count[rows], np.arange(tokens.shape[1])
        at = start[:, None] + col  # [l, w] position of each token in its row
        fits = (col < count[:, None]) & (at < self.max_new)  # a prefix of each run
        stop = np.isin(tokens, self._stop_ids) & fits
        n = np.minimum(fits.sum(axis=1), np.where(stop, col, tokens.shape[1]).min(axis=1, initial=tokens.shape[1]) + 1)
        stopped = stop[np.arange(len(rows)), n - 1]
        keep = col < n[:, None]
        where = (np.broadcast_to(rows[:, None], at.shape)[keep], at[keep])
        self._tokens[where], self._logprobs[where] = tokens[keep], logprobs[keep]
        if self.stops:
            for i in np.flatnonzero(~stopped).tolist():
                r, s = int(rows[i]), int(start[i])
                hit = next((j for j in range(int(n[i])) if self.stops.hit(self._tokens[r, : s + j + 1].tolist())), None)
                if hit is not None:  # the run's tokens after the stop string are dropped
                    self._tokens[r, s + hit + 1: s + n[i]], self._logprobs[r, s + hit + 1: s + n[i]] = self.pad_id, 0.0
                    n[i], stopped[i] = hit + 1, True
        self._count[rows] = start + n
        ended = stopped | (start + n >= self.max_new)
        for j in np.flatnonzero(ended).tolist():
            self.reason[int(rows[j])] = "stop" if stopped[j] else "length"
        self._finished[rows[ended]] = True
        done[live[ended]] = True
        return torch.from_numpy(done)


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

