"""PyTorch models of online instrumentation (the ``train`` extra).

Both take, per note, the absolute pitch (embedded) and the featurizer's
vector (:mod:`coplayer.instrument.features`), and return logits over parts.
They are causal: the output at note n depends on notes 1..n only, and both
have a ``step`` that carries state (LSTM h/c, transformer KV cache) so that
streaming never re-runs the past.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StreamingModel(nn.Module):
    """What every instrumentation model shares: a named, batched streaming state.

    ``state_names`` names the state tensors ``step`` takes and returns (the
    ONNX graph's state inputs/outputs); ``state_batch_dims`` says where each
    keeps its batch axis, so :meth:`select_state` can freeze finished rows.
    """

    state_names: tuple[str, ...] = ()
    state_batch_dims: tuple[int, ...] = ()

    def select_state(self, mask: torch.Tensor, new: tuple, old: tuple) -> tuple:
        """Per batch row, ``new`` where ``mask`` [B] (bool) is true, else ``old``."""
        if bool(mask.all()):  # the common case costs nothing, even for a large KV cache
            return tuple(new)
        out = []
        for dim, n, o in zip(self.state_batch_dims, new, old, strict=True):
            shape = [1] * n.ndim
            shape[dim] = -1
            out.append(torch.where(mask.view(shape), n, o))
        return tuple(out)

    def index_state(self, state: tuple, rows: torch.Tensor) -> tuple:
        """The state of batch rows ``rows`` [R] (int64), e.g. to drop finished rows."""
        return tuple(s.index_select(dim, rows) for dim, s in zip(self.state_batch_dims, state, strict=True))


class InstrumentLSTM(StreamingModel):
    kind = "lstm"
    state_names = ("h", "c")
    state_batch_dims = (1, 1)

    def __init__(self, n_features: int, n_parts: int, hidden: int = 192, layers: int = 2,
                 pitch_dim: int = 16, dropout: float = 0.1):
        super().__init__()
        self.hparams = dict(n_features=n_features, n_parts=n_parts, hidden=hidden,
                            layers=layers, pitch_dim=pitch_dim, dropout=dropout)
        self.pitch = nn.Embedding(128, pitch_dim)
        self.inp = nn.Sequential(nn.Linear(n_features + pitch_dim, hidden), nn.GELU())
        self.lstm = nn.LSTM(hidden, hidden, layers, batch_first=True, dropout=dropout)
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden * 2, hidden), nn.GELU(),
                                 nn.Linear(hidden, n_parts))

    def initial_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.hparams["layers"], batch, self.hparams["hidden"])
        return torch.zeros(shape), torch.zeros(shape)

    def forward(self, pitch: torch.Tensor, feats: torch.Tensor, state=None):
        """pitch [B,T] int64, feats [B,T,F] -> logits [B,T,K], (h, c)."""
        x = self.inp(torch.cat([self.pitch(pitch), feats], dim=-1))
        y, state = self.lstm(x, state)
        # A skip from the note's own features sharpens the read-out.
        return self.out(torch.cat([y, x], dim=-1)), state

    def step(self, pitch: torch.Tensor, feats: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        """One note: pitch [B], feats [B,F], h/c [L,B,H] -> logits [B,K], h, c."""
        logits, (h, c) = self.forward(pitch[:, None], feats[:, None, :], (h, c))
        return logits[:, 0], h, c


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's per-head penalty per note of distance: 2^(-8/h), 2^(-16/h), ... (Press et al.)."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)])


class _Block(nn.Module):
    """Pre-LN decoder block: ``project`` the notes to q/k/v, then ``attend`` and mix."""

    def __init__(self, dim: int, heads: int, dropout: float, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.drop = nn.Dropout(dropout)

    def project(self, x: torch.Tensor):
        """x [B,T,D] -> q, k, v, each [B,H,T,Dh]."""
        b, t, d = x.shape
        return self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def attend(self, x, q, k, v, mask, past=None):
        """x [B,T,D], q/k/v [B,H,T,Dh], mask [B|1,H,T,P+T] additive -> x [B,T,D].

        ``past`` holds the cached keys and values [B,H,P,Dh]; they are scored
        in place rather than concatenated with the new ones, so a step reads
        the cache once and never copies it.
        """
        b, t, d = x.shape
        if past is None:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            k_past, v_past = past
            q = q * q.shape[-1] ** -0.5
            w = (torch.cat([q @ k_past.transpose(-1, -2), q @ k.transpose(-1, -2)], dim=-1) + mask).softmax(-1)
            p = k_past.shape[2]
            a = w[..., :p] @ v_past + w[..., p:] @ v
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class InstrumentTransformer(StreamingModel):
    """Causal pre-LN transformer over notes with a sliding window of ``window`` notes.

    Positions are ALiBi biases on the distance between notes, and every note
    attends to itself and the ``window - 1`` notes before it, in training as in
    streaming, so a fixed-size KV cache reproduces ``forward`` exactly on
    unbounded input.  The state has fixed shapes (no dynamic axes in ONNX):

    - ``k_cache``, ``v_cache`` [layers, B, heads, window-1, head_dim]: keys and
      values of the last window-1 notes, oldest first, newest in the last slot;
    - ``valid`` [B, window-1] float 0/1: which slots hold a note (right-aligned).
    """

    kind = "transformer"
    state_names = ("k_cache", "v_cache", "valid")
    state_batch_dims = (1, 1, 0)

    def __init__(self, n_features: int, n_parts: int, hidden: int = 128, layers: int = 3,
                 heads: int = 4, window: int = 128, pitch_dim: int = 16, dropout: float = 0.1):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        if window < 2:
            raise ValueError(f"window must be at least 2 notes, got {window}")
        self.hparams = dict(n_features=n_features, n_parts=n_parts, hidden=hidden, layers=layers,
                            heads=heads, window=window, pitch_dim=pitch_dim, dropout=dropout)
        self.pitch = nn.Embedding(128, pitch_dim)
        self.inp = nn.Sequential(nn.Linear(n_features + pitch_dim, hidden), nn.GELU())
        self.blocks = nn.ModuleList(_Block(hidden, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden * 2, hidden), nn.GELU(),
                                 nn.Linear(hidden, n_parts))
        self.register_buffer("slopes", alibi_slopes(heads), persistent=False)

    def initial_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.hparams
        shape = (h["layers"], batch, h["heads"], h["window"] - 1, h["hidden"] // h["heads"])
        return torch.zeros(shape), torch.zeros(shape), torch.zeros(batch, h["window"] - 1)

    def _mask(self, valid: torch.Tensor | None, t: int) -> torch.Tensor:
        """Additive attention mask [B|1,H,T,P+T]: ALiBi inside the window, -inf outside or empty."""
        p = 0 if valid is None else valid.shape[1]
        dist = (torch.arange(t, device=self.slopes.device)[:, None] + p
                - torch.arange(p + t, device=self.slopes.device)[None, :])  # [T,S] query minus key
        allowed = (dist >= 0) & (dist < self.hparams["window"])
        bias = -self.slopes[:, None, None] * dist.to(self.slopes.dtype)  # [H,T,S]
        if valid is None:  # no cache: one mask for the whole batch
            return bias.masked_fill(~allowed, float("-inf"))[None]
        filled = torch.cat([valid > 0.5, valid.new_ones(valid.shape[0], t, dtype=torch.bool)], dim=1)
        allowed = allowed[None, None] & filled[:, None, None, :]  # [B,1,T,S]
        return bias[None].masked_fill(~allowed, float("-inf"))

    def _last(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The last window-1 entries of ``x`` along ``dim``, left-padded with zeros if fewer."""
        keep = self.hparams["window"] - 1
        n = x.shape[dim]
        if n >= keep:
            return x.narrow(dim, n - keep, keep)
        return F.pad(x, [0, 0] * (x.ndim - 1 - dim) + [keep - n, 0])

    def forward(self, pitch: torch.Tensor, feats: torch.Tensor, state=None):
        """pitch [B,T] int64, feats [B,T,F] -> logits [B,T,K], (k_cache, v_cache, valid).

        Without ``state`` the notes start a performance (training); with it,
        they continue the cached past (``step`` is the T=1 case).
        """
        b, t = pitch.shape
        keep = self.hparams["window"] - 1
        k_cache, v_cache, valid = (None, None, None) if state is None else state
        x0 = self.inp(torch.cat([self.pitch(pitch), feats], dim=-1))
        x, mask, ks, vs = x0, self._mask(valid, t), [], []
        for i, block in enumerate(self.blocks):
            q, k, v = block.project(x)
            x = block.attend(x, q, k, v, mask, None if state is None else (k_cache[i], v_cache[i]))
            ks.append(k[:, :, -keep:])
            vs.append(v[:, :, -keep:])
        # As in the LSTM, a skip from the note's own input sharpens the read-out.
        logits = self.out(torch.cat([self.ln_f(x), x0], dim=-1))
        k_new, v_new, filled = torch.stack(ks), torch.stack(vs), x0.new_ones(b, t)
        if state is not None:  # the one copy of the cache per step: shift in the new notes
            k_new, v_new = torch.cat([k_cache, k_new], dim=3), torch.cat([v_cache, v_new], dim=3)
            filled = torch.cat([valid, filled], dim=1)
        return logits, (self._last(k_new, 3), self._last(v_new, 3), self._last(filled, 1))

    def step(self, pitch: torch.Tensor, feats: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, valid: torch.Tensor):
        """One note: pitch [B], feats [B,F], state -> logits [B,K], k_cache, v_cache, valid."""
        logits, state = self.forward(pitch[:, None], feats[:, None, :], (k_cache, v_cache, valid))
        return (logits[:, 0], *state)
