"""Sequence models on fastdl's fused primitives: a GPT, the encoder-decoder Transformer, an LSTM
language model and a GRU seq2seq, each with a plain-torch twin in ``twins/sequence.py``.

Attention is ``fastdl.scaled_dot_product_attention`` (FlashAttention-2 style, q/k/v read straight
from the projection's output through strides), every residual add is fused into the LayerNorm
that follows it (``fastdl.add_layer_norm``), recurrences are ``fastdl.nn.LSTM`` / ``GRU``. Token
embeddings, the linear layers and GELU are torch's (fastdl has no twin of them). No dropout: the
models are small, and a deterministic step is what the twin comparison needs.

The data is made here (``fastdl.models.corpus``): a generated English-like corpus (words for the
GPT, characters for the LSTM), reversing a generated clause (Transformer), sorting digits
(seq2seq).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

import fastdl
from fastdl import _checks
from fastdl.models import corpus
from fastdl.models.spec import ModelSpec, add_norm, check_heads
from fastdl.models.twins import sequence as twins


def check_tokens(
    model: str, name: str, ids: torch.Tensor, vocab: int, max_len: int | None = None
) -> None:
    """ValueError unless ``ids`` is a (batch, time) integer tensor with 1 <= time <= max_len and
    every id in [0, vocab): caught here, before an embedding reads out of bounds."""
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{model}: {name} must be a tensor of token ids, got {type(ids).__name__}")
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        # A wrong dtype raises _checks.DtypeError, a ValueError as well (and a TypeError).
        bad_dtype = ids.dim() == 2
        raise (_checks.DtypeError if bad_dtype else ValueError)(
            f"{model}: {name} must be a (batch, time) tensor of integer token ids (int64 or "
            f"int32), got shape {list(ids.shape)}, dtype {ids.dtype}"
        )
    t = ids.shape[1]
    if t == 0:
        raise ValueError(f"{model}: {name} has no tokens (time dimension 0)")
    if max_len is not None and t > max_len:
        raise ValueError(
            f"{model}: {name} has {t} tokens per sequence, more than the context of {max_len}"
        )
    if torch.compiler.is_compiling():  # .item() would break the graph: checked inside it
        inside = ((ids >= 0) & (ids < vocab)).all()
        torch._assert_async(inside, f"{model}: {name} holds token ids outside [0, {vocab})")
        return
    if ids.numel():
        lo, hi = (v.item() for v in torch.aminmax(ids))
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"{model}: {name} holds token ids outside [0, {vocab}): min {lo}, max {hi}"
            )


def check_start(model: str, start: int, vocab: int) -> int:
    """The start token as an int (any integer type: a numpy or 0-d torch integer too)."""
    token = _checks.as_int(start)
    if token is None:
        raise TypeError(f"{model}: start must be an int token id, got {start!r}")
    if not 0 <= token < vocab:
        raise ValueError(f"{model}: start token {token} is outside [0, {vocab})")
    return token


def check_steps(model: str, name: str, steps: int) -> int:
    """A generate length as an int >= 0 (any integer type, as check_start; 0 gives no tokens, a
    negative count would give none silently)."""
    count = _checks.as_int(steps)
    if count is None or count < 0:
        raise ValueError(f"{model}: {name} must be an int >= 0, got {steps!r}")
    return count


class Attention(nn.Module):
    """Multi-head attention (Vaswani et al., 2017, §3.2.2) on fastdl's fused kernel. Self-attention
    projects q, k and v with one GEMM (``qkv``); cross-attention (``cross=True``) projects q from
    x (``q``) and k, v from the memory (``kv``). The heads are strided views of the projection,
    which the kernel reads in place: no transposed copies on the way in."""

    def __init__(self, d_model: int, heads: int, cross: bool = False):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"Attention: d_model {d_model} is not a multiple of heads {heads}")
        self.heads = heads
        if cross:
            self.q = nn.Linear(d_model, d_model)
            self.kv = nn.Linear(d_model, 2 * d_model)
        else:
            self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def _heads(self, x: torch.Tensor, n: int):
        b, t, _ = x.shape
        dh = x.shape[-1] // (n * self.heads)  # not -1: a batch of 0 has no size to infer
        return x.view(b, t, n, self.heads, dh).permute(2, 0, 3, 1, 4)  # (n, B, H, T, Dh)

    def forward(self, x, memory=None, mask=None, causal=False):
        if memory is None:
            q, k, v = self._heads(self.qkv(x), 3)
        else:
            q = self._heads(self.q(x), 1)[0]
            k, v = self._heads(self.kv(memory), 2)
        o = fastdl.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.out(o.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """Position-wise ``proj(gelu(fc(x)))``, hidden width 4 * d_model."""

    def __init__(self, d_model: int):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x):
        h = self.fc(x)
        # Without autograd (inference) GELU overwrites its input: no second (B, T, 4d) buffer.
        return self.proj(F.gelu(h) if h.requires_grad else torch.ops.aten.gelu_(h))


class GPTBlock(nn.Module):
    """Pre-norm block ``x += attn(ln1(x)); x += mlp(ln2(x))``, written for the fused add+norm:
    ``forward(d, x)`` takes the previous branch's output ``d`` not yet added to ``x`` and returns
    its own MLP output and ``x`` before that add, so every residual add is fused into the
    LayerNorm after it (this block's ln1, the next block's, or the model's final norm) and a
    block reads only its own weights (FSDP2 can shard it as a unit)."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.ln1 = fastdl.nn.LayerNorm(d_model)
        self.attn = Attention(d_model, heads)
        self.ln2 = fastdl.nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model)

    def forward(self, d, x):
        h, x = add_norm(d, x, self.ln1)
        h, x = add_norm(self.attn(h, causal=True), x, self.ln2)
        return self.mlp(h), x


class GPT(nn.Module):
    """Decoder-only Transformer language model (Radford et al., 2018/2019): token + learned
    position embeddings, ``layers`` pre-norm blocks with causal self-attention and a GELU MLP, a
    final LayerNorm and an untied linear head (untied so that ``fastdl.quantize_model`` turns it
    into an INT8 layer as well). ``forward(idx)``: idx (B, T) int64 ids, T <= context -> logits
    (B, T, vocab_size)."""

    def __init__(self, vocab_size: int, context: int, d_model: int, heads: int, layers: int):
        super().__init__()
        for name, value in (("layers", layers), ("context", context)):
            if value < 1:
                raise ValueError(f"GPT: {name} must be at least 1, got {value}")
        check_heads("GPT", "d_model", d_model, heads)
        self.vocab_size, self.context = vocab_size, context
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(GPTBlock(d_model, heads) for _ in range(layers))
        self.ln_f = fastdl.nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        check_tokens("GPT", "idx", idx, self.vocab_size, self.context)
        tok = self.tok_emb(idx)
        # The embedding sum is fused into the first block's ln1 like every other residual add.
        d, x = tok, self.pos_emb.weight[: idx.shape[1]].expand_as(tok)
        for block in self.blocks:
            d, x = block(d, x)
        return self.head(add_norm(d, x, self.ln_f)[0])

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding: appends ``max_new_tokens`` argmax tokens to idx (B, T), each step
        seeing the last ``context`` tokens (no KV cache: each step reruns the window)."""
        check_tokens("GPT", "idx", idx, self.vocab_size)
        max_new_tokens = check_steps("GPT", "max_new_tokens", max_new_tokens)
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.context :])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return idx


def sinusoids(length: int, d_model: int) -> torch.Tensor:
    """The sinusoidal position encoding of Vaswani et al. (2017, §3.5), (length, d_model)."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(1e4) / d_model))
    pe = torch.zeros(length, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : d_model // 2]
    return pe.float()


class EncoderLayer(nn.Module):
    """Post-norm encoder layer, as in the paper: ``x = ln1(x + attn(x)); x = ln2(x + ff(x))``."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.attn = Attention(d_model, heads)
        self.ln1 = fastdl.nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model)
        self.ln2 = fastdl.nn.LayerNorm(d_model)

    def forward(self, x, keep):
        x = add_norm(self.attn(x, mask=keep), x, self.ln1)[0]
        return add_norm(self.ff(x), x, self.ln2)[0]


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: causal self-attention, cross-attention to the encoder's output
    (source padding masked), feed-forward, each followed by add + LayerNorm."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.self_attn = Attention(d_model, heads)
        self.ln1 = fastdl.nn.LayerNorm(d_model)
        self.cross_attn = Attention(d_model, heads, cross=True)
        self.ln2 = fastdl.nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model)
        self.ln3 = fastdl.nn.LayerNorm(d_model)

    def forward(self, x, memory, keep):
        # Targets are right-padded, so under the causal mask a real position never sees a pad:
        # the target needs no padding mask (the loss ignores the pad positions themselves).
        x = add_norm(self.self_attn(x, causal=True), x, self.ln1)[0]
        x = add_norm(self.cross_attn(x, memory, mask=keep), x, self.ln2)[0]
        return add_norm(self.ff(x), x, self.ln3)[0]


class Transformer(nn.Module):
    """The encoder-decoder Transformer of Vaswani et al. (2017): embeddings scaled by
    sqrt(d_model) plus sinusoidal positions, ``layers`` post-norm encoder and decoder layers (as
    in the paper; GELU in the feed-forward), a linear head. ``forward(src, tgt)``: src (B, S)
    and the teacher-forced decoder input tgt (B, T), int64 ids with S, T <= max_len; source
    tokens equal to ``pad_id`` are masked out of every attention over the source. Returns
    logits (B, T, tgt_vocab)."""

    def __init__(
        self,
        src_vocab: int,
        tgt_vocab: int,
        max_len: int,
        d_model: int,
        heads: int,
        layers: int,
        pad_id: int = corpus.PAD,
    ):
        super().__init__()
        check_heads("Transformer", "d_model", d_model, heads)
        if max_len < 1:
            raise ValueError(f"Transformer: max_len must be at least 1, got {max_len}")
        # pad_id marks source padding, so it must be a source token id.
        if not 0 <= pad_id < src_vocab:
            raise ValueError(f"Transformer: pad_id {pad_id} is outside [0, src_vocab={src_vocab})")
        self.src_vocab, self.tgt_vocab, self.max_len, self.pad_id = (
            src_vocab,
            tgt_vocab,
            max_len,
            pad_id,
        )
        self.src_emb = nn.Embedding(src_vocab, d_model)
        self.tgt_emb = nn.Embedding(tgt_vocab, d_model)
        self.register_buffer("pe", sinusoids(max_len, d_model), persistent=False)
        self.encoder = nn.ModuleList(EncoderLayer(d_model, heads) for _ in range(layers))
        self.decoder = nn.ModuleList(DecoderLayer(d_model, heads) for _ in range(layers))
        self.head = nn.Linear(d_model, tgt_vocab)

    def _embed(self, emb: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        return emb(ids) * math.sqrt(emb.embedding_dim) + self.pe[: ids.shape[1]]

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        check_tokens("Transformer", "src", src, self.src_vocab, self.max_len)
        check_tokens("Transformer", "tgt", tgt, self.tgt_vocab, self.max_len)
        if src.shape[0] != tgt.shape[0]:
            raise ValueError(
                f"Transformer: src and tgt must have the same batch size, got {src.shape[0]} "
                f"and {tgt.shape[0]}"
            )
        return self._decode(*self._encode(src), tgt)

    def _encode(self, src):
        keep = (src != self.pad_id)[:, None, None, :]  # (B, 1, 1, S): True attends
        memory = self._embed(self.src_emb, src)
        for layer in self.encoder:
            memory = layer(memory, keep)
        return memory, keep

    def _decode(self, memory, keep, tgt):
        x = self._embed(self.tgt_emb, tgt)
        for layer in self.decoder:
            x = layer(x, memory, keep)
        return self.head(x)

    @torch.no_grad()
    def generate(self, src: torch.Tensor, steps: int, start: int = corpus.BOS) -> torch.Tensor:
        """Greedy decoding: the source encoded once, then ``steps`` tokens (B, steps), each the
        argmax after the start token and the tokens so far (the prefix is rerun: no KV cache)."""
        check_tokens("Transformer", "src", src, self.src_vocab, self.max_len)
        start = check_start("Transformer", start, self.tgt_vocab)
        steps = check_steps("Transformer", "steps", steps)
        if steps > self.max_len:  # the last step decodes a prefix of `steps` tokens
            raise ValueError(
                f"Transformer: steps must be at most max_len {self.max_len}, got {steps}"
            )
        memory, keep = self._encode(src)
        tgt = torch.full((src.shape[0], 1), start, device=src.device)
        for _ in range(steps):
            nxt = self._decode(memory, keep, tgt)[:, -1].argmax(-1, keepdim=True)
            tgt = torch.cat([tgt, nxt], dim=1)
        return tgt[:, 1:]


class LSTMLanguageModel(nn.Module):
    """Embedding -> ``layers``-layer LSTM (fastdl.nn.LSTM) -> linear head. ``forward(idx)``: idx
    (B, T) int64 -> logits (B, T, vocab_size). The recurrence runs time-major: the embedding
    gathers straight into (T, B, ...), the layout the kernel walks.

    A token's input to the first layer is its embedding times W_ih, row v of the (vocab, 4H)
    table ``emb.weight W_ih^T``: when the vocabulary has fewer entries than the batch has tokens,
    the model builds that table (per call, so the gradients reach both weights) and the LSTM op
    gathers its rows (``index``), in place of the (tokens, embed) x (embed, 4H) products of the
    forward and of the backward (dx, dW_ih)."""

    def __init__(self, vocab_size: int, embed: int, hidden: int, layers: int = 1):
        super().__init__()
        self.vocab_size = vocab_size
        self.emb = nn.Embedding(vocab_size, embed)
        self.lstm = fastdl.nn.LSTM(embed, hidden, layers)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        check_tokens("LSTMLanguageModel", "idx", idx, self.vocab_size)
        ids = idx.t()
        # (Only in dtypes the kernels take: float16 on the CPU runs torch's LSTM, which has no
        # projected input.)
        if self.vocab_size < ids.numel() and _checks.kernels_take(self.emb.weight):
            table = F.linear(self.emb.weight, self.lstm.weight_ih_l0)
            y, _ = self.lstm(table, projected=True, index=ids)
        else:
            y, _ = self.lstm(self.emb(ids))
        return self.head(y).transpose(0, 1)


class Seq2Seq(nn.Module):
    """GRU encoder-decoder (Cho et al., 2014; Sutskever et al., 2014): the encoder's final hidden
    state starts the decoder, which reads the teacher-forced target (the target shifted right
    behind a start token). ``forward(src, tgt)``: src (B, S), tgt (B, T) int64 -> logits
    (B, T, tgt_vocab). fastdl.nn.GRU for both recurrences."""

    def __init__(self, src_vocab: int, tgt_vocab: int, embed: int, hidden: int, layers: int = 1):
        super().__init__()
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab
        self.src_emb = nn.Embedding(src_vocab, embed)
        self.encoder = fastdl.nn.GRU(embed, hidden, layers)
        self.tgt_emb = nn.Embedding(tgt_vocab, embed)
        self.decoder = fastdl.nn.GRU(embed, hidden, layers)
        self.head = nn.Linear(hidden, tgt_vocab)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        check_tokens("Seq2Seq", "src", src, self.src_vocab)
        check_tokens("Seq2Seq", "tgt", tgt, self.tgt_vocab)
        if src.shape[0] != tgt.shape[0]:
            raise ValueError(
                f"Seq2Seq: src and tgt must have the same batch size, got {src.shape[0]} and "
                f"{tgt.shape[0]}"
            )
        _, h = self.encoder(self.src_emb(src.t()))
        y, _ = self.decoder(self.tgt_emb(tgt.t()), h)
        return self.head(y).transpose(0, 1)

    @torch.no_grad()
    def generate(self, src: torch.Tensor, steps: int, start: int) -> torch.Tensor:
        """Greedy decoding without teacher forcing: from ``start``, each step's argmax is the
        next step's input; returns the ``steps`` tokens (B, steps)."""
        check_tokens("Seq2Seq", "src", src, self.src_vocab)
        start = check_start("Seq2Seq", start, self.tgt_vocab)
        steps = check_steps("Seq2Seq", "steps", steps)
        _, h = self.encoder(self.src_emb(src.t()))
        tok = torch.full((1, src.shape[0]), start, device=src.device)
        out = [tok]  # dropped at the end, as Transformer.generate: steps=0 gives (B, 0)
        for _ in range(steps):
            y, h = self.decoder(self.tgt_emb(tok), h)
            tok = self.head(y).argmax(-1)
            out.append(tok)
        return torch.cat(out)[1:].t()


# ---------------------------------------------------------------- data and specs


def token_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the (B, T) targets; -100 marks a position without a target."""
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def _windows(stream: torch.Tensor, gen: torch.Generator, batch: int, length: int):
    """``batch`` random windows of ``length + 1`` consecutive tokens: (inputs, next tokens)."""
    start = torch.randint(0, len(stream) - length, (batch, 1), generator=gen)
    w = stream[start + torch.arange(length + 1)]
    return w[:, :-1], w[:, 1:]


# The "small config" of each model: what the benchmark times and `python -m fastdl train` trains.
GPT_CONFIG = {
    "vocab_size": len(corpus.VOCAB),
    "context": 256,
    "d_model": 256,
    "heads": 4,
    "layers": 4,
}
GPT_BATCH = 16
LSTM_CONFIG = {"embed": 128, "hidden": 512, "layers": 1}
LSTM_BATCH, LSTM_STEPS = 64, 128
CLAUSE_LEN = 12  # reversal task: source clauses of at most this many words
TRANSFORMER_CONFIG = {
    "src_vocab": len(corpus.VOCAB),
    "tgt_vocab": len(corpus.VOCAB),
    "max_len": CLAUSE_LEN + 1,
    "d_model": 128,
    "heads": 4,
    "layers": 2,
}
TRANSFORMER_BATCH = 64
DIGITS, DIGITS_LEN = 10, 12  # sorting task: sequences of DIGITS_LEN digits; id 10 starts
SEQ2SEQ_CONFIG = {
    "src_vocab": DIGITS,
    "tgt_vocab": DIGITS + 1,
    "embed": 32,
    "hidden": 256,
    "layers": 1,
}
SEQ2SEQ_BATCH = 128


def gpt_batch(gen: torch.Generator, device: torch.device):
    x, y = _windows(corpus.words(), gen, GPT_BATCH, GPT_CONFIG["context"])
    return (x.to(device),), y.to(device)


def lstm_batch(gen: torch.Generator, device: torch.device):
    x, y = _windows(corpus.chars(), gen, LSTM_BATCH, LSTM_STEPS)
    return (x.to(device),), y.to(device)


def reversal_pairs(src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For right-padded clauses src (B, S): the decoder input ``<bos> reversed`` and its target
    ``reversed <eos>`` (B, S + 1), padding marked -100 in the target."""
    b, s = src.shape
    lengths = (src != corpus.PAD).sum(1, keepdim=True)
    pos = torch.arange(s)
    rev = src.gather(1, (lengths - 1 - pos).clamp(min=0)).masked_fill(pos >= lengths, corpus.PAD)
    full = torch.cat([torch.full((b, 1), corpus.BOS), rev, torch.full((b, 1), corpus.PAD)], 1)
    full.scatter_(1, lengths + 1, corpus.EOS)
    target = full[:, 1:].masked_fill(full[:, 1:] == corpus.PAD, -100)
    return full[:, :-1], target


def transformer_batch(gen: torch.Generator, device: torch.device):
    pool = corpus.clauses(4096, CLAUSE_LEN)
    src = pool[torch.randint(0, len(pool), (TRANSFORMER_BATCH,), generator=gen)]
    tgt, target = reversal_pairs(src)
    return (src.to(device), tgt.to(device)), target.to(device)


def sorting_pairs(src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For digit sequences src (B, L): the decoder input ``<start> sorted[:-1]`` and the target
    ``sorted``."""
    target = src.sort(1).values
    start = torch.full((src.shape[0], 1), DIGITS)
    return torch.cat([start, target[:, :-1]], 1), target


def seq2seq_batch(gen: torch.Generator, device: torch.device):
    src = torch.randint(0, DIGITS, (SEQ2SEQ_BATCH, DIGITS_LEN), generator=gen)
    tgt, target = sorting_pairs(src)
    return (src.to(device), tgt.to(device)), target.to(device)


SPECS = (
    ModelSpec(
        name="gpt",
        group="sequence",
        task=f"next word of generated English-like sentences ({len(corpus.VOCAB)} words)",
        build=lambda: GPT(**GPT_CONFIG),
        twin=lambda: twins.GPT(**GPT_CONFIG),
        batch=gpt_batch,
        loss=token_loss,
        lr=1e-3,
    ),
    ModelSpec(
        name="transformer",
        group="sequence",
        task="reverse the word order of a generated clause (padded, up to 12 words)",
        build=lambda: Transformer(**TRANSFORMER_CONFIG),
        twin=lambda: twins.Transformer(**TRANSFORMER_CONFIG),
        batch=transformer_batch,
        loss=token_loss,
        lr=5e-4,
    ),
    ModelSpec(
        name="lstm-lm",
        group="sequence",
        task="next character of generated English-like sentences",
        build=lambda: LSTMLanguageModel(len(corpus.ALPHABET), **LSTM_CONFIG),
        twin=lambda: twins.LSTMLanguageModel(len(corpus.ALPHABET), **LSTM_CONFIG),
        batch=lstm_batch,
        loss=token_loss,
        lr=2e-3,
    ),
    ModelSpec(
        name="seq2seq",
        group="sequence",
        task=f"sort a sequence of {DIGITS_LEN} random digits",
        build=lambda: Seq2Seq(**SEQ2SEQ_CONFIG),
        twin=lambda: twins.Seq2Seq(**SEQ2SEQ_CONFIG),
        batch=seq2seq_batch,
        loss=token_loss,
        lr=2e-3,
    ),
)
