"""MTP self-speculative decoding (``SamplingConfig.speculative = "mtp"``): the policy's own MTP module drafts
k tokens per sequence, the main model verifies them in one multi-token step, and the standard
speculative-sampling rule keeps the output distribution exactly the policy's.

The rule, at one position, for the target distribution p (the main model's logits at that position under
the sampling's temperature and top-k / top-p / min-p truncation, ``grpo.sampling.distribution``) and the
draft distribution q (the MTP module's logits under the same temperature and truncation):

    draw d ~ q;  accept d with probability min(1, p(d) / q(d))   (u q(d) < p(d), u ~ U[0, 1))
    otherwise emit x ~ normalize(max(0, p - q))

Exactness: P(emit x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y min(q(y), p(y))) max(0, p(x) - q(x)) / Z with
Z = sum_y max(0, p(y) - q(y)) = 1 - sum_y min(p(y), q(y)), so P(emit x) = min(p(x), q(x)) + max(0, p(x) - q(x))
= p(x), whatever q is (q only needs to be the distribution d was actually drawn from, and independent of
the acceptance uniforms). Positions are handled left to right: draft j is judged against the target at its
position, which the verify step computed from exactly the tokens emitted before it (the sequence's tokens
and drafts 1..j-1, all accepted), so each emitted token has the policy's conditional distribution given
the emitted prefix. The first rejection ends the round (later drafts were conditioned on a rejected token);
when all k drafts are accepted, one more token is drawn from the target at the position after them (the
verify step computed it anyway). A round thus emits 1..k+1 tokens, each distributed exactly as in one-token
sampling; the differences are fp32 summation order only (~1e-6 in the logits). Greedy decoding (T = 0)
is the special case of one-hot p and q: a draft is kept iff it is the target's argmax, and a rejection emits
the argmax.

The returned log-probs are the target's, log softmax(z / T) at each emitted token with z the verify step's
logits (temperature 1 when greedy): the same quantity as without speculation, so the trainer needs no
correction.

Drafting (one MTP module, chained for k > 1; ``grpo.model``'s MTP forward): MTP position i combines the main
model's final hidden state h_i with the embedding of token t_{i+1} and predicts t_{i+2}. A slot at position
p (main cache below p, next input t_p) has MTP positions p - m .. p - 1 pending (``grpo.engine.containers.Pending``:
m = 1 after the prefill, else the tokens the last round emitted). A round runs

    1. the MTP module over the pending positions (one multi-token step of width k + 1, rows past m unused):
       its output at p - 1 gives the draft distribution q_1 of t_{p+1}; draw d_1;
    2. for j = 2..k: the MTP module at position p + j - 2 on its own previous output (in place of the main
       model's hidden state, not known yet) and d_{j-1}, giving q_j; draw d_j;
    3. the main model over [t_p, d_1, .., d_k] at positions p .. p + k (``V3Decoder.verify``): targets
       p_1 .. p_{k+1};
    4. acceptance (``accept``): a drafts kept, then the rejection's residual draw or the bonus draw, a + 1
       tokens emitted; positions p .. p + a become pending with the verify step's hidden states.

The caches take all written latents and the slot's position advances by a + 1 (``grpo.engine.v3``: what
lies beyond a slot's position is rewritten before it is read; step 2's provisional MTP latents are
rewritten by the next round's step 1).
"""
from __future__ import annotations

import torch

from grpo.engine.graphs import BucketedGraphs
from grpo.engine.protocol import Drafts
from grpo.sampling import distribution, inverse_cdf


def accept(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, uniform: torch.Tensor):
    """The speculative-sampling rule (module docstring) for n sequences of k drafts: target distributions p
    [n, k+1, V] (position j judges draft j; the last one is the bonus position), draft distributions q
    [n, k, V], drafts [n, k], uniforms [n, k+1] (k acceptance tests and the final draw). Returns (tokens
    [n, k+1]: the first count are emitted, count [n] in 1..k+1)."""
    n, k = drafts.shape
    row = torch.arange(n, device=p.device)
    p_draft = p[:, :k].gather(2, drafts[..., None])[..., 0]
    q_draft = q.gather(2, drafts[..., None])[..., 0]
    kept = (uniform[:, :k] * q_draft < p_draft).long().cumprod(dim=1).sum(dim=1)  # [n] leading accepted drafts
    at = kept.clamp(max=k - 1)
    residual = (p[row, at] - q[row, at]).clamp(min=0)
    final = torch.where((kept == k)[:, None], p[:, k], residual)
    tokens = torch.cat((drafts, drafts[:, :1]), dim=1)
    tokens[row, kept] = inverse_cdf(final, uniform[:, k])
    return tokens, kept + 1


def draw(logits: torch.Tensor, uniform: torch.Tensor, **sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """A draft from the MTP module's logits [n, V] with uniforms [n]: (q [n, V] the draft distribution under
    ``sampling``, the drawn tokens [n])."""
    q = distribution(logits, **sampling)
    return q, inverse_cdf(q, uniform)


def judge(z: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, uniform: torch.Tensor, **sampling):
    """The round's outcome from the verify step's logits z [n, k+1, V] (``accept``'s p after ``sampling``),
    the drafts' distributions q [n, k, V], drafts [n, k] and uniforms [n, k+1]: (tokens [n, k+1], their
    target log-probs log softmax(z / T) [n, k+1] (temperature 1 when greedy), count [n])."""
    n, width, _ = z.shape
    z = z.float()
    tokens, count = accept(distribution(z.flatten(0, 1), **sampling).view(n, width, -1), q, drafts, uniform)
    scaled = z / (sampling["temperature"] or 1.0)
    logprobs = scaled.gather(2, tokens[..., None])[..., 0] - torch.logsumexp(scaled, dim=-1)  # no [n, k+1, V] out
    return tokens, logprobs, count


# Compiled once per process (the CUDA graphs' form): each fuses the float conversion, softmax, truncation and
# inverse CDF passes over [rows, V] into a few kernels; the batch is the only dynamic size.
_compiled_draw = torch.compile(draw)
_compiled_judge = torch.compile(judge)


class Speculator:
    """One speculative round for the active slots of a ``Drafts`` decoder (``V3Decoder`` with ``draft_tokens``
    = k; module docstring), sampling as ``sampling`` (``grpo.sampling.sample``'s keyword arguments) with uniforms
    from ``generator``.

    With ``graphs`` (CUDA) a round is replayed from CUDA graphs (``grpo.engine.graphs.BucketedGraphs``): only
    the uniforms are drawn outside, and the draws and the judgement run compiled (``draw``, ``judge``). Rows
    n..bucket-1 are free slots, run at position 1 with one pending MTP position (so every write stays inside
    their own cache rows, below k + 2) and ignored; the prefill of their next sequence rewrites those rows
    before they are read. Without graphs a round launches its few hundred kernels one by one (ten times a plain
    decode step at batch 200 on an H100)."""

    def __init__(self, decoder: Drafts, sampling: dict, generator: torch.Generator, graphs: bool = False,
                 span_step: int = 64):
        self.dec, self.sampling, self.generator = decoder, sampling, generator
        self.k = decoder.draft_tokens
        self.draw, self.judge = (_compiled_draw, _compiled_judge) if graphs else (draw, judge)
        self.graphs = BucketedGraphs(decoder, self.round, generator, (2 * self.k + 1,),
                                     [decoder.tokens, decoder.positions, *decoder.pending], self._free,
                                     span_step) if graphs else None

    def __call__(self, n: int, span: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A round for slots 0..n-1 at ``positions[:n]`` (all positions + k < span). Returns (tokens [n, k+1],
        logprobs [n, k+1], count [n]) on the device, without waiting for them: each slot's first count tokens are
        emitted; the decoder's next input tokens, positions (by count) and pending MTP positions are updated.
        With graphs, the outputs are valid until the next round."""
        if self.graphs is None:
            uniform = torch.rand(n, 2 * self.k + 1, generator=self.generator, device=self.dec.device)
            tokens, logprobs, count = self.round(n, span, uniform)
        else:
            tokens, logprobs, count = self.graphs(n, span)
        return tokens[:n], logprobs[:n], count[:n]

    def round(self, n: int, span: int, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The round's device work for slots 0..n-1 with uniforms [n, 2k+1] (k + 1 acceptance tests and the
        final draw, then k drafting draws), free of host synchronisation; returns (tokens, logprobs, count)
        on the device."""
        dec, k, pending = self.dec, self.k, self.dec.pending
        pos, row = dec.positions[:n], torch.arange(n, device=dec.device)
        judging, drawing = uniform[:, : k + 1], uniform[:, k + 1:]
        m = pending.count[:n]
        inputs = pending.tokens[:n].scatter(1, (m - 1)[:, None], dec.tokens[:n, None])
        hidden, normed = (t[row, m - 1] for t in dec.mtp_step(inputs, pending.hidden[:n], pos - m, span))
        drafts, q = [], []
        for j in range(k):
            q_j, d_j = self.draw(dec.lm_head(normed), drawing[:, j], **self.sampling)
            q.append(q_j)
            drafts.append(d_j)
            if j + 1 < k:
                hidden, normed = (t[:, 0] for t in dec.mtp_step(d_j[:, None], hidden[:, None], pos + j, span))
        drafts = torch.stack(drafts, dim=1)
        final = dec.verify(torch.cat((dec.tokens[:n, None], drafts), dim=1), span)  # [n, k+1, D]
        tokens, logprobs, count = self.judge(dec.lm_head(final), torch.stack(q, dim=1), drafts, judging,
                                             **self.sampling)
        pending.hidden[:n], pending.tokens[:n], pending.count[:n] = final, tokens, count
        dec.tokens[:n] = tokens[row, count - 1]
        dec.positions[:n] += count
        return tokens, logprobs, count

    def _free(self, n: int, batch: int) -> None:
        """Free slots run at position 1 with one pending MTP position (class docstring)."""
        self.dec.positions[n:batch] = 1
        self.dec.pending.count[n:batch] = 1


def acceptance(kept: torch.Tensor) -> dict[str, float]:
    """From kept [k+1] (rounds per sequence that kept 0..k drafts): spec_accept_rate_{j} (j = 1..k: the fraction
    of rounds that kept draft j among those that kept drafts 1..j-1), spec_tokens_per_step (tokens emitted per
    sequence and verify step) and spec_rounds (verify steps summed over sequences)."""
    k, rounds = len(kept) - 1, int(kept.sum())
    reached = kept.flip(0).cumsum(0).flip(0)  # reached[j]: rounds that kept >= j drafts
    out = {f"spec_accept_rate_{j}": float(reached[j]) / max(int(reached[j - 1]), 1) for j in range(1, k + 1)}
    emitted = int((kept * torch.arange(1, k + 2)).sum())
    return dict(out, spec_tokens_per_step=emitted / max(rounds, 1), spec_rounds=rounds)
