"""The continuation model: a causal transformer over multi-field note events (the ``train`` extra).

Input per event: the sum of one embedding per field (:data:`FIELDS`), of
its position in the bar and of two intervals (from its part's last pitch
and from the last event's, :class:`coplayer.gen.runner.PitchContext`).  A pre-LN decoder (ALiBi positions, every event
attends to itself and the ``window - 1`` events before it) turns the events
into hidden states; the hidden state after event t scores event t+1 with
FIVE heads, one per field, in FIELDS order: head k sees the hidden state
plus embeddings of the fields 0..k-1 of the event it predicts (teacher
forced in training, chosen by the sampler live).  MMT predicts a note's
fields independently; here the pitch knows its part and onset, the duration
its pitch, and so on.  The pitch head adds two experts: absolute pitches
(register, key) and intervals from the anchor of the chosen part (voice
leading, transposition-invariant).  The loss is the sum of the five
cross-entropies.

A piece starts with a BOS event (shift class ``sizes['shift']``, the other
fields 0), so the first note is scored too.  Streaming uses the same
sliding window as training, so streaming is exact on unbounded input: ``decode``
takes T new events and a ring cache of the last ``window - 1`` events (which
it only reads: the caller writes the new keys/values into it, so no step
copies the cache) and returns the last hidden state and the new keys/values;
a step for T = 1.  Without a cache it is the prefill of the first events.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from coplayer.gen.encoding import FIELDS
from coplayer.gen.runner import INTERVAL_CLASSES
from models.instrument import _Block, alibi_slopes

POS_CLASSES = 96
PITCH = FIELDS.index("pitch")
REL_RANGE = 25  # the pitch head's relative classes: -25..+25 semitones from the anchor (the ends: further)


class FieldHead(nn.Module):
    """Logits of one field from the hidden state plus the embeddings of the fields before it."""

    def __init__(self, dim: int, classes: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(dim, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ContinuationTransformer(nn.Module):
    kind = "transformer"

    def __init__(self, sizes: list[int], n_pos: int = POS_CLASSES, dim: int = 256, layers: int = 4,
                 heads: int = 4, window: int = 256, mlp_ratio: int = 4, dropout: float = 0.1):
        super().__init__()
        if len(sizes) != len(FIELDS):
            raise ValueError(f"sizes must give the classes of {len(FIELDS)} fields {FIELDS}, got {sizes}")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        if window < 2:
            raise ValueError(f"window must be at least 2 events, got {window}")
        self.hparams = dict(sizes=list(sizes), n_pos=n_pos, dim=dim, layers=layers, heads=heads,
                            window=window, mlp_ratio=mlp_ratio, dropout=dropout)
        self.sizes = list(sizes)
        self.bos_shift = sizes[0]  # one extra input class of the shift field
        self.embed = nn.ModuleList(nn.Embedding(n + (i == 0), dim) for i, n in enumerate(sizes))
        self.pos_embed = nn.Embedding(n_pos, dim)
        self.rel_embed = nn.ModuleList(nn.Embedding(INTERVAL_CLASSES, dim) for _ in range(2))
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout, mlp_ratio) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.cond = nn.ModuleList(nn.Embedding(n, dim) for n in sizes[:-1])
        # The pitch head scores absolute pitches and intervals from the anchor; their sum is the logit.
        self.heads = nn.ModuleList(FieldHead(dim, n + (2 * REL_RANGE + 1 if i == PITCH else 0), dropout)
                                   for i, n in enumerate(sizes))
        self.drop = nn.Dropout(dropout)
        self.register_buffer("slopes", alibi_slopes(heads), persistent=False)
        self.apply(_init)

    # -- inputs ------------------------------------------------------------------

    def bos(self, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The BOS event [B,1,5], its position [B,1] and relative-pitch inputs [B,1,2]."""
        events = torch.zeros(batch, 1, len(FIELDS), dtype=torch.long)
        events[..., 0] = self.bos_shift
        rel = torch.full((batch, 1, 2), INTERVAL_CLASSES - 1, dtype=torch.long)
        return events, torch.zeros(batch, 1, dtype=torch.long), rel

    def embed_events(self, events: torch.Tensor, pos: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
        """events [B,T,5], pos [B,T], rel [B,T,2] (:class:`~coplayer.gen.runner.PitchContext`) -> [B,T,D]."""
        x = self.pos_embed(pos)
        for i, emb in enumerate(self.embed):
            x = x + emb(events[..., i])
        for i, emb in enumerate(self.rel_embed):
            x = x + emb(rel[..., i])
        return self.drop(x)

    # -- the decoder ---------------------------------------------------------------

    def _bias(self, t: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ALiBi bias [H,T,P+T] and the band of allowed keys [T,P+T] for T queries after P cached keys."""
        dist = (torch.arange(t, device=self.slopes.device)[:, None] + p
                - torch.arange(p + t, device=self.slopes.device)[None, :])
        allowed = (dist >= 0) & (dist < self.hparams["window"])
        return -self.slopes[:, None, None] * dist.to(self.slopes.dtype), allowed

    def forward(self, events: torch.Tensor, pos: torch.Tensor, rel: torch.Tensor,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """Training: events [B,T,5], pos [B,T], rel [B,T,2] -> hidden [B,T,D] (after the final LayerNorm).

        ``segments`` [B,T] (optional) separates pieces packed in one row:
        an event attends only to events of its own segment.
        """
        b, t = pos.shape
        bias, allowed = self._bias(t, 0)
        allowed = allowed[None, None]
        if segments is not None:
            allowed = allowed & (segments[:, None, :, None] == segments[:, None, None, :])
        mask = bias[None].masked_fill(~allowed, float("-inf"))
        x = self.embed_events(events, pos, rel)
        for block in self.blocks:
            q, k, v = block.project(x)
            x = block.attend(x, q, k, v, mask)
        return self.ln_f(x)

    def initial_state(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Empty ring caches: keys [H,Dh,R] (transposed), values [H,R,Dh], ages [R] (R = window-1)."""
        h = self.hparams
        slots, dh = h["window"] - 1, h["dim"] // h["heads"]
        ks = [torch.zeros(h["heads"], dh, slots) for _ in range(h["layers"])]
        vs = [torch.zeros(h["heads"], slots, dh) for _ in range(h["layers"])]
        return ks, vs, torch.full((slots,), float(h["window"]))

    def decode(self, events: torch.Tensor, pos: torch.Tensor, rel: torch.Tensor,
               k_cache: list[torch.Tensor] | None = None, v_cache: list[torch.Tensor] | None = None,
               age: torch.Tensor | None = None):
        """Streaming, one sequence: T new events [1,T,5] (pos [1,T], rel [1,T,2]) after the cached ones
        -> hidden of the last [1,D],
        and the keys [H,Dh,T] and values [H,T,Dh] of the new events per layer.

        The cache is a ring of ``window - 1`` slots per layer that the caller
        owns and updates (it is only read here, never copied): keys [H,Dh,R]
        (transposed), values [H,R,Dh], and ``age`` [R] float, the number of
        events between each slot's event and the last event fed (0 = the last;
        ``window`` or more = empty).  Without a cache (``k_cache`` None) the
        events are the first ones (the prefill graph); T = 1 is a step.  Only
        the last event goes through the top layer's attention and MLP.
        """
        t = pos.shape[1]
        heads, window = self.hparams["heads"], self.hparams["window"]
        dh = self.hparams["dim"] // heads
        cached = k_cache is not None
        bias_n, allowed_n = self._bias(t, 0)
        bias_n = bias_n.masked_fill(~allowed_n, float("-inf"))  # [H,T,T]
        if cached:
            dist_c = age[None, :] + 1 + torch.arange(t, dtype=age.dtype)[:, None]  # [T,R]: query i to slot j
            bias_c = (-self.slopes[:, None, None] * dist_c).masked_fill(~(dist_c < window), float("-inf"))
        x = self.embed_events(events, pos, rel)[0]  # [T,D]: 2-D, so every Linear is one Gemm
        ks, vs = [], []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            qkv = block.qkv(block.ln1(x)).view(t, 3, heads, dh).permute(1, 2, 0, 3)  # [3,H,T,Dh]
            q, k, v = qkv[0] * dh ** -0.5, qkv[1].transpose(1, 2), qkv[2]
            ks.append(k)
            vs.append(v)
            if i == last:  # only the last event's hidden state is needed from here on
                x, q, bias_n = x[-1:], q[:, -1:], bias_n[:, -1:]
                if cached:
                    bias_c = bias_c[:, -1:]
            scores = q @ k + bias_n
            if cached:
                scores = torch.softmax(torch.cat([q @ k_cache[i] + bias_c, scores], dim=-1), dim=-1)
                slots = k_cache[i].shape[-1]
                a = scores[..., :slots] @ v_cache[i] + scores[..., slots:] @ v
            else:
                a = torch.softmax(scores, dim=-1) @ v
            x = x + block.proj(a.transpose(0, 1).reshape(x.shape[0], -1))
            x = x + block.mlp(block.ln2(x))
        return self.ln_f(x[-1:]), ks, vs

    # -- the heads -------------------------------------------------------------------

    def head_input(self, k: int, hidden: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """Head k's input: hidden [...,D] plus the embeddings of fields [..., >=k] 0..k-1."""
        x = hidden
        for j in range(k):
            x = x + self.cond[j](fields[..., j])
        return x

    def field_logits(self, k: int, hidden: torch.Tensor, fields: torch.Tensor,
                     anchor: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of field k of the next event, given its fields 0..k-1 (``fields`` [..., >=k]).

        The pitch head needs ``anchor`` [...] (int64): the anchor pitch of the
        chosen part (:meth:`PitchContext.anchor`), -1 for none.
        """
        out = self.heads[k](self.head_input(k, hidden, fields))
        if k != PITCH:
            return out
        n = self.sizes[PITCH]
        absolute, relative = out[..., :n], out[..., n:]
        anchor = anchor[..., None]
        steps = torch.arange(n, dtype=anchor.dtype) - anchor  # [..., 128]: interval of each pitch
        index = steps.clamp(-REL_RANGE, REL_RANGE) + REL_RANGE
        return absolute + torch.gather(relative, -1, index) * (anchor >= 0).to(out.dtype)

    def losses(self, hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
               anchor: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy (nats) per field [5] over positions where ``weight`` [B,T] is 1.

        ``targets`` [B,T,5] is the event after each position and ``anchor``
        [B,T] its anchor pitch (teacher forcing: every head is conditioned on
        the true earlier fields).
        """
        out = []
        w = weight.reshape(-1)
        for k in range(len(FIELDS)):
            logits = self.field_logits(k, hidden, targets, anchor)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets[..., k].reshape(-1),
                                 reduction="none")
            out.append((ce * w).sum())
        return torch.stack(out)


def _init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


class DecoderGraph(nn.Module):
    """``decode`` as a module with flat arguments: (events, pos, rel, age, k_cache_0.., v_cache_0..)
    -> (hidden, k_new_0.., v_new_0..); with ``cached=False`` (the prefill graph) only (events, pos, rel)."""

    def __init__(self, model: ContinuationTransformer, cached: bool = True):
        super().__init__()
        self.model, self.cached = model, cached
        self.layers = model.hparams["layers"]

    def forward(self, events, pos, rel, age=None, *cache):
        if self.cached:
            hidden, ks, vs = self.model.decode(events, pos, rel, list(cache[:self.layers]),
                                               list(cache[self.layers:]), age)
        else:
            hidden, ks, vs = self.model.decode(events, pos, rel)
        return (hidden, *ks, *vs)


class HeadGraph(nn.Module):
    """Head k as a module: (hidden [B,D], fields [B,k] (none for k = 0), anchor [B] for pitch) -> logits [B,C]."""

    def __init__(self, model: ContinuationTransformer, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, hidden, fields=None, anchor=None):
        if fields is None:
            return self.model.heads[self.k](hidden)
        return self.model.field_logits(self.k, hidden, fields, anchor)
