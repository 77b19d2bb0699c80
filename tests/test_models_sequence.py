"""fastdl.models.sequence against the plain-torch twins of fastdl.models.twins.sequence: the same
weights give the same outputs and gradients, 20 AdamW steps on the same batches give the same
losses (Liger-Kernel's convergence test), bad inputs raise a clear ValueError. Small configs;
the specs' own (bench-sized) configs are built and compared forward only."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from fastdl.models import corpus, sequence
from fastdl.models import train as training
from fastdl.models.twins import sequence as twins

SMALL = {
    "gpt": {"vocab_size": len(corpus.VOCAB), "context": 16, "d_model": 32, "heads": 4, "layers": 2},
    "transformer": {
        "src_vocab": len(corpus.VOCAB),
        "tgt_vocab": len(corpus.VOCAB),
        "max_len": 9,
        "d_model": 32,
        "heads": 4,
        "layers": 2,
    },
    "lstm-lm": {"vocab_size": len(corpus.ALPHABET), "embed": 16, "hidden": 32, "layers": 2},
    "seq2seq": {"src_vocab": 10, "tgt_vocab": 11, "embed": 8, "hidden": 32, "layers": 2},
}
CLASSES = {
    "gpt": (sequence.GPT, twins.GPT),
    "transformer": (sequence.Transformer, twins.Transformer),
    "lstm-lm": (sequence.LSTMLanguageModel, twins.LSTMLanguageModel),
    "seq2seq": (sequence.Seq2Seq, twins.Seq2Seq),
}
NAMES = tuple(SMALL)
BATCH = 6


@pytest.fixture(autouse=True)
def one_thread():
    """The small configs run on one thread: at these sizes a second thread's fork/join costs more
    than it saves, and on a loaded 2-core machine each join can wait out a scheduler slice."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_batch(name: str, gen: torch.Generator):
    """The spec's kind of data at the small config: (inputs, target)."""
    if name == "gpt":
        x, y = sequence._windows(corpus.words(), gen, BATCH, SMALL["gpt"]["context"])
        return (x,), y
    if name == "lstm-lm":
        x, y = sequence._windows(corpus.chars(), gen, BATCH, 12)
        return (x,), y
    if name == "transformer":
        pool = corpus.clauses(256, SMALL["transformer"]["max_len"] - 1)
        src = pool[torch.randint(0, len(pool), (BATCH,), generator=gen)]
        tgt, target = sequence.reversal_pairs(src)
        return (src, tgt), target
    src = torch.randint(0, 10, (BATCH, 7), generator=gen)
    tgt, target = sequence.sorting_pairs(src)
    return (src, tgt), target


def pair(name: str):
    """The fastdl model and its twin holding the same weights."""
    torch.manual_seed(0)
    cls, twin_cls = CLASSES[name]
    model, twin = cls(**SMALL[name]), twin_cls(**SMALL[name])
    twin.load_state_dict(model.state_dict())
    return model, twin


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the error against the twin's output scale."""
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", NAMES)
def test_same_parameter_names(name):
    model, twin = pair(name)
    assert list(model.state_dict()) == list(twin.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in twin.named_parameters()]


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_gradients_match_twin(name):
    model, twin = pair(name)
    inputs, target = small_batch(name, torch.Generator().manual_seed(1))
    out, ref = model(*inputs), twin(*inputs)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-4
    sequence.token_loss(out, target).backward()
    sequence.token_loss(ref, target).backward()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, n
        assert rel_err(p.grad, q.grad) <= 1e-4, n


@pytest.mark.parametrize("name", NAMES)
def test_twenty_training_steps_match_twin(name):
    cls, twin_cls = CLASSES[name]
    spec = dataclasses.replace(
        next(s for s in sequence.SPECS if s.name == name),
        build=lambda: cls(**SMALL[name]),
        twin=lambda: twin_cls(**SMALL[name]),
        batch=lambda gen, device: small_batch(name, gen),
    )
    run = training.train(spec, 20, torch.device("cpu"), seed=2)
    ours, theirs = run.losses["fastdl"], run.losses["torch"]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert sum(ours[-3:]) < sum(ours[:3])  # it learns


@pytest.mark.parametrize("batch,steps", [(6, 12), (2, 5)])
def test_lstm_lm_input_table_when_the_vocabulary_is_small(batch, steps):
    """With more tokens than vocabulary entries the LSTM LM hands its LSTM an embedding x W_ih
    table, which the op reads at the token ids (projected=True, index=ids), otherwise it embeds;
    both give the twin's outputs and gradients."""
    model, twin = pair("lstm-lm")
    calls = []
    forward = model.lstm.forward

    def spy(*a, **k):
        calls.append(k.get("projected", False) and k.get("index") is not None)
        return forward(*a, **k)

    model.lstm.forward = spy
    x, target = sequence._windows(corpus.chars(), torch.Generator().manual_seed(3), batch, steps)
    out, ref = model(x), twin(x)
    assert calls == [batch * steps > model.vocab_size]
    assert rel_err(out, ref) <= 1e-4
    sequence.token_loss(out, target).backward()
    sequence.token_loss(ref, target).backward()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert rel_err(p.grad, q.grad) <= 1e-4, n


def test_lstm_lm_float16_on_the_cpu_runs_torchs_lstm():
    """A dtype the kernels do not take keeps the embedding path (torch's LSTM, the module's
    fallback, has no projected input), also for batches with more tokens than the vocabulary."""
    model, twin = pair("lstm-lm")
    model, twin = model.half(), twin.half()
    x = torch.arange(60).view(5, 12) % model.vocab_size
    torch.testing.assert_close(model(x), twin(x))


def test_comparison_detects_a_changed_weight():
    """The twin comparison is sharp enough to see one LayerNorm bias moved by 0.01."""
    model, twin = pair("gpt")
    inputs, _ = small_batch("gpt", torch.Generator().manual_seed(1))
    with torch.no_grad():
        twin.blocks[1].ln2.bias[0] += 0.01
    assert rel_err(model(*inputs), twin(*inputs)) > 1e-4


def test_gpt_generate_is_greedy_decoding():
    model, twin = pair("gpt")
    prompt = torch.tensor([[corpus.VOCAB.index("the"), corpus.VOCAB.index("old")]] * 2)
    out = model.generate(prompt, 20)  # runs past the context of 16: the window slides
    assert out.shape == (2, 22) and torch.equal(out[:, :2], prompt)
    ref = prompt
    with torch.no_grad():
        for _ in range(20):
            nxt = twin(ref[:, -SMALL["gpt"]["context"] :])[:, -1].argmax(-1, keepdim=True)
            ref = torch.cat([ref, nxt], 1)
    assert torch.equal(out, ref)


@pytest.mark.parametrize(("name", "start"), [("transformer", corpus.BOS), ("seq2seq", 10)])
def test_encoder_decoder_generate_feeds_back_its_argmax(name, start):
    """Greedy decoding agrees with the teacher-forced forward fed its own output."""
    model, _ = pair(name)
    (src, _), _ = small_batch(name, torch.Generator().manual_seed(3))
    out = model.generate(src, 8, start)
    assert out.shape == (BATCH, 8)
    fed = torch.cat([torch.full((BATCH, 1), start), out[:, :-1]], 1)
    with torch.no_grad():
        assert torch.equal(model(src, fed).argmax(-1), out)
    with pytest.raises(ValueError, match=r"start token -1 is outside \[0, "):
        model.generate(src, 8, -1)


@pytest.mark.parametrize("spec", sequence.SPECS, ids=lambda s: s.name)
def test_spec_config_matches_twin(spec):
    """The bench-sized config of each spec: its data, its twin, the same loss."""
    torch.manual_seed(0)
    model, twin = spec.build(), spec.twin()
    twin.load_state_dict(model.state_dict())
    inputs, target = spec.batch(torch.Generator().manual_seed(0), torch.device("cpu"))
    with torch.no_grad():
        out, ref = model(*inputs), twin(*inputs)
    assert out.shape[:2] == target.shape
    assert rel_err(out, ref) <= 1e-4
    loss = spec.loss(out, target)
    assert torch.isfinite(loss) and abs(loss - spec.loss(ref, target)) <= 1e-4 * loss


def test_tasks_by_hand():
    src = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 0, 0, 0]])
    tgt, target = sequence.reversal_pairs(src)
    b, e = corpus.BOS, corpus.EOS
    assert tgt.tolist() == [[b, 7, 6, 5, e, 0], [b, 9, 8, e, 0, 0]]
    assert target.tolist() == [[7, 6, 5, e, -100, -100], [9, 8, e, -100, -100, -100]]
    tgt, target = sequence.sorting_pairs(torch.tensor([[3, 1, 2, 1]]))
    assert tgt.tolist() == [[10, 1, 1, 2]] and target.tolist() == [[1, 1, 2, 3]]


def test_corpus_is_deterministic_and_in_vocabulary():
    words = corpus.words(200, seed=5)
    assert torch.equal(words, corpus.words.__wrapped__(200, seed=5))
    assert words.min() >= 0 and words.max() < len(corpus.VOCAB)
    assert len(corpus.VOCAB) > 300 and corpus.VOCAB[: len(corpus.SPECIALS)] == corpus.SPECIALS
    text = corpus.text(200, seed=5)
    assert set(text) <= set(corpus.ALPHABET) and text.endswith(".")
    # Number agreement: in a clause without prepositional phrases the verb follows the subject.
    singular = {s for s, _ in corpus.NOUNS}
    verbs = corpus.TRANSITIVE + corpus.INTRANSITIVE
    third = {f[0] for f in verbs}
    base = {f[1] for f in verbs} - {f[2] for f in verbs}  # "read" is a past form too
    present = 0
    for row in corpus.clauses(500, 12).tolist():
        clause = [corpus.VOCAB[i] for i in row]
        found = next(((a, b) for a, b in itertools.pairwise(clause) if b in third | base), None)
        if found is not None:  # a present-tense clause
            present += 1
            assert (found[0] in singular) == (found[1] in third), clause
    assert present > 200


def _bad(name: str):
    """(inputs, message) pairs every model must refuse."""
    vocab = {"lstm-lm": len(corpus.ALPHABET), "seq2seq": 10}.get(name, len(corpus.VOCAB))
    ok = torch.zeros(2, 4, dtype=torch.long)
    arg = "idx" if name in ("gpt", "lstm-lm") else "src"

    def inputs(x):
        return (x,) if arg == "idx" else (x, ok)

    cases = [
        (inputs([[1, 2]]), rf"{arg} must be a tensor of token ids, got list"),
        (inputs(torch.zeros(4, dtype=torch.long)), rf"{arg} must be a \(batch, time\) tensor"),
        (
            inputs(torch.zeros(2, 4)),
            rf"{arg} must be .* integer token ids \(int64 or int32\), got .*float32",
        ),
        (inputs(torch.zeros(2, 0, dtype=torch.long)), rf"{arg} has no tokens"),
        (inputs(torch.full((2, 4), -1)), rf"{arg} holds token ids outside \[0, {vocab}\): min -1"),
        (inputs(torch.full((2, 4), vocab)), rf"{arg} holds token ids outside .* max {vocab}"),
    ]
    if name == "gpt":
        cases.append(
            (
                (torch.zeros(2, 17, dtype=torch.long),),
                "idx has 17 tokens per sequence, more than the context of 16",
            )
        )
    if name in ("transformer", "seq2seq"):
        cases.append(
            (
                (ok, torch.zeros(3, 4, dtype=torch.long)),
                "src and tgt must have the same batch size, got 2 and 3",
            )
        )
        cases.append(((ok, torch.full((2, 4), 10**4)), r"tgt holds token ids outside"))
    if name == "transformer":
        cases.append(((ok, torch.zeros(2, 10, dtype=torch.long)), "tgt has 10 tokens .* of 9"))
    return cases


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch_and_compile_fullgraph(name):
    # The token check runs inside the compiled graph (no host read), and a batch of 0 passes.
    model = CLASSES[name][0](**SMALL[name]).eval()
    inputs = [torch.zeros(2, 4, dtype=torch.long)] * (1 if name in ("gpt", "lstm-lm") else 2)
    empty = [t[:0] for t in inputs]
    assert model(*empty).shape[0] == 0
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), model(*inputs))
    if name == "lstm-lm":  # more tokens than vocabulary entries: the input-table path too
        table = torch.arange(40).view(4, 10) % len(corpus.ALPHABET)
        torch.testing.assert_close(compiled(table), model(table))


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise(name):
    model = CLASSES[name][0](**SMALL[name])
    label = {"gpt": "GPT", "transformer": "Transformer", "lstm-lm": "LSTMLanguageModel"}
    for inputs, message in _bad(name):
        with pytest.raises(ValueError, match=f"^{label.get(name, 'Seq2Seq')}: {message}"):
            model(*inputs)


def test_bad_constructor_arguments():
    # Named after the model and its own arguments, not the Attention submodule.
    gpt, tr = dict(SMALL["gpt"], d_model=30), dict(SMALL["transformer"], d_model=30)
    for cls, kwargs, label in (
        (sequence.GPT, gpt, "GPT"),
        (sequence.Transformer, tr, "Transformer"),
    ):
        with pytest.raises(
            ValueError, match=rf"^{label}: heads \(4\) must be a positive divisor of d_model \(30\)"
        ):
            cls(**kwargs)
    for cls, kwargs, label in (
        (sequence.GPT, dict(SMALL["gpt"], d_model=257, heads=1), "GPT"),
        (sequence.Transformer, dict(SMALL["transformer"], d_model=514, heads=2), "Transformer"),
    ):
        with pytest.raises(ValueError, match=rf"^{label}: d_model / heads = 257 is above .* 256"):
            cls(**kwargs)
    with pytest.raises(ValueError, match=r"^GPT: context must be at least 1, got 0"):
        sequence.GPT(**dict(SMALL["gpt"], context=0))
    with pytest.raises(ValueError, match=r"^Transformer: max_len must be at least 1, got 0"):
        sequence.Transformer(**dict(SMALL["transformer"], max_len=0))
    vocab = SMALL["transformer"]["src_vocab"]
    for pad in (vocab, -1):
        with pytest.raises(
            ValueError, match=rf"^Transformer: pad_id {pad} is outside \[0, src_vocab={vocab}\)"
        ):
            sequence.Transformer(**SMALL["transformer"], pad_id=pad)


@pytest.mark.parametrize(
    ("name", "arg"), [("gpt", "max_new_tokens"), ("transformer", "steps"), ("seq2seq", "steps")]
)
def test_generate_step_counts(name, arg):
    """0 steps give no new tokens in every generate; a negative count is refused."""
    model, _ = pair(name)
    (src, *_), _ = small_batch(name, torch.Generator().manual_seed(3))
    extra = () if name == "gpt" else (10,) if name == "seq2seq" else (corpus.BOS,)
    out = model.generate(src, 0, *extra)
    assert out.shape == ((BATCH, src.shape[1]) if name == "gpt" else (BATCH, 0))
    label = {"gpt": "GPT", "transformer": "Transformer", "seq2seq": "Seq2Seq"}[name]
    for steps in (-1, 2.0):
        with pytest.raises(ValueError, match=rf"^{label}: {arg} must be an int >= 0, got {steps}"):
            model.generate(src, steps, *extra)
    if name != "gpt":  # a start token that is not an int id
        for start in (1.0, True):
            with pytest.raises(TypeError, match=rf"^{label}: start must be an int token id"):
                model.generate(src, 2, start)
        # any integer type is an int id
        expected = model.generate(src, 2, 1)
        for start in (np.int64(1), torch.tensor(1)):
            assert torch.equal(model.generate(src, 2, start), expected)
    # any integer type is a step count too
    expected = model.generate(src, 2, *extra)
    for steps in (np.int64(2), torch.tensor(2)):
        assert torch.equal(model.generate(src, steps, *extra), expected)


def test_transformer_generates_up_to_max_len_tokens():
    """The last of max_len steps decodes a prefix of max_len tokens: allowed (the reversal task's
    targets are max_len tokens long, <eos> last); one more is refused."""
    model, _ = pair("transformer")
    (src, *_), _ = small_batch("transformer", torch.Generator().manual_seed(3))
    n = model.max_len
    assert model.generate(src, n).shape == (BATCH, n)
    with pytest.raises(ValueError, match=rf"^Transformer: steps must be at most max_len {n}"):
        model.generate(src, n + 1)
