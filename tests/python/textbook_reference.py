"""The chapter's published multi-head attention, kept unchanged as the textbook reference.

``ChapterMultiHeadAttention`` is the class ``MultiHeadAttention`` of "Introduction to NLP with
Transformers", 4.4, verbatim, plus the two lines its ``__init__`` leaves out
(``self.attention`` and ``self.dropout``), defined as BERT-pytorch, which it follows, defines
them. ``Attention`` is BERT-pytorch's ``bert_pytorch/model/attention/single.py``. Tests compare
``torchmha.TextbookMultiHeadAttention`` with it; nothing here is torchmha code.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Compute 'Scaled Dot Product Attention' (BERT-pytorch)."""

    def forward(self, query, key, value, mask=None, dropout=None):
        scores = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(query.size(-1))

        if mask is not None:
            scores = scores.masked_fill(mask == 0, -1e9)

        p_attn = F.softmax(scores, dim=-1)

        if dropout is not None:
            p_attn = dropout(p_attn)

        return torch.matmul(p_attn, value), p_attn


class ChapterMultiHeadAttention(nn.Module):
    """The chapter's ``MultiHeadAttention(h, d_model, dropout)``."""

    def __init__(self, h, d_model, dropout=0.1):
        super().__init__()
        assert d_model % h == 0

        self.d_k = d_model // h
        self.h = h

        self.linear_layers = nn.ModuleList([nn.Linear(d_model, d_model) for _ in range(3)])
        self.output_linear = nn.Linear(d_model, d_model)
        self.attention = Attention()
        # Missing from the chapter's listing; BERT-pytorch defines it so.
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, query, key, value, mask=None):
        batch_size = query.size(0)

        query, key, value = [
            l(x).view(batch_size, -1, self.h, self.d_k).transpose(1, 2)
            for l, x in zip(self.linear_layers, (query, key, value))  # noqa: E741 (the chapter's name)
        ]

        x, self.attn = self.attention(query, key, value, mask=mask, dropout=self.dropout)

        x = x.transpose(1, 2).contiguous().view(batch_size, -1, self.h * self.d_k)

        return self.output_linear(x)
