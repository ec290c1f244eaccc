"""PyTorch models of online instrumentation (the ``train`` extra).

Both take, per note, the absolute pitch (embedded) and the featurizer's
vector (:mod:`coplayer.instrument.features`), and return logits over parts.
They are causal: the output at note n depends on notes 1..n only, and both
have a ``step`` that carries state (LSTM h/c, transformer KV cache) so that
streaming never re-runs the past.
"""

from __future__ import annotations

import torch
from torch import nn


class InstrumentLSTM(nn.Module):
    kind = "lstm"

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
