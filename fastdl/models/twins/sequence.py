"""Plain torch.nn twins of fastdl.models.sequence: the textbook forms (``x = x + f(norm(x))``,
``F.scaled_dot_product_attention``, ``nn.LayerNorm``, ``nn.LSTM`` / ``nn.GRU``), the same
parameter names, no fastdl. The recurrent models run time-major, as their fastdl twins do, so
the two are timed on the same layout."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, d_model: int, heads: int, cross: bool = False):
        super().__init__()
        self.heads = heads
        if cross:
            self.q = nn.Linear(d_model, d_model)
            self.kv = nn.Linear(d_model, 2 * d_model)
        else:
            self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x, memory=None, mask=None, causal=False):
        if memory is None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q = self.q(x)
            k, v = self.kv(memory).chunk(2, dim=-1)
        q, k, v = self._split(q), self._split(k), self._split(v)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.out(o.transpose(1, 2).reshape(x.shape))


class FeedForward(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class GPTBlock(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model)

    def forward(self, x):
        x = x + self.attn(self.ln1(x), causal=True)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, context: int, d_model: int, heads: int, layers: int):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(GPTBlock(d_model, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def sinusoids(length: int, d_model: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(1e4) / d_model))
    pe = torch.zeros(length, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : d_model // 2]
    return pe.float()


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.attn = Attention(d_model, heads)
        self.ln1 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model)
        self.ln2 = nn.LayerNorm(d_model)

    def forward(self, x, keep):
        x = self.ln1(x + self.attn(x, mask=keep))
        return self.ln2(x + self.ff(x))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.self_attn = Attention(d_model, heads)
        self.ln1 = nn.LayerNorm(d_model)
        self.cross_attn = Attention(d_model, heads, cross=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model)
        self.ln3 = nn.LayerNorm(d_model)

    def forward(self, x, memory, keep):
        x = self.ln1(x + self.self_attn(x, causal=True))
        x = self.ln2(x + self.cross_attn(x, memory, mask=keep))
        return self.ln3(x + self.ff(x))


class Transformer(nn.Module):
    def __init__(self, src_vocab, tgt_vocab, max_len, d_model, heads, layers, pad_id=0):
        super().__init__()
        self.pad_id = pad_id
        self.src_emb = nn.Embedding(src_vocab, d_model)
        self.tgt_emb = nn.Embedding(tgt_vocab, d_model)
        self.register_buffer("pe", sinusoids(max_len, d_model), persistent=False)
        self.encoder = nn.ModuleList(EncoderLayer(d_model, heads) for _ in range(layers))
        self.decoder = nn.ModuleList(DecoderLayer(d_model, heads) for _ in range(layers))
        self.head = nn.Linear(d_model, tgt_vocab)

    def _embed(self, emb, ids):
        return emb(ids) * math.sqrt(emb.embedding_dim) + self.pe[: ids.shape[1]]

    def forward(self, src, tgt):
        keep = (src != self.pad_id)[:, None, None, :]
        memory = self._embed(self.src_emb, src)
        for layer in self.encoder:
            memory = layer(memory, keep)
        x = self._embed(self.tgt_emb, tgt)
        for layer in self.decoder:
            x = layer(x, memory, keep)
        return self.head(x)


class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab_size, embed, hidden, layers=1):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(embed, hidden, layers)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, idx):
        y, _ = self.lstm(self.emb(idx.t()))
        return self.head(y).transpose(0, 1)


class Seq2Seq(nn.Module):
    def __init__(self, src_vocab, tgt_vocab, embed, hidden, layers=1):
        super().__init__()
        self.src_emb = nn.Embedding(src_vocab, embed)
        self.encoder = nn.GRU(embed, hidden, layers)
        self.tgt_emb = nn.Embedding(tgt_vocab, embed)
        self.decoder = nn.GRU(embed, hidden, layers)
        self.head = nn.Linear(hidden, tgt_vocab)

    def forward(self, src, tgt):
        _, h = self.encoder(self.src_emb(src.t()))
        y, _ = self.decoder(self.tgt_emb(tgt.t()), h)
        return self.head(y).transpose(0, 1)
