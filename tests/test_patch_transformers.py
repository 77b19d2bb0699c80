"""fastdl on HuggingFace transformers models built from configs (random weights, no downloads):
fastdl.patch switches attention to attn_implementation="fastdl" and swaps the norms; logits,
gradients and greedy generation match the unpatched model; unpatch restores it; models that
transformers keeps off sdpa are left; the attention function itself against transformers' "sdpa"
one on masks, GQA, scaling, position bias and batch broadcasting, and against the model's eager
function where it takes what neither does (softcap, sinks)."""

import copy
import io

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm

import fastdl
from fastdl.integrations import transformers as hf
from fastdl.ops import attention as A

VOCAB = 97
SMALL = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}


def gpt2():
    cfg = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, **SMALL,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)


def bert():
    cfg = BertConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        **SMALL,
    )  # fmt: skip
    return BertForMaskedLM(cfg)


# A small grouped-query decoder (Llama-style configs).
DECODER = {
    "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 64, **SMALL,
}  # fmt: skip


def llama(layers=2):
    cfg = LlamaConfig(num_hidden_layers=layers, intermediate_size=128, **DECODER)
    return LlamaForCausalLM(cfg)


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        num_hidden_layers=2, head_dim=16, intermediate_size=128, sliding_window=4,
        attn_logit_softcapping=0.5, **DECODER,
    )  # fmt: skip
    return Gemma2ForCausalLM(cfg)


def gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(
        num_hidden_layers=2, head_dim=16, intermediate_size=64, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=4, **DECODER,
    )  # fmt: skip
    return GptOssForCausalLM(cfg)


def pegasus_x():
    from transformers import PegasusXConfig, PegasusXForConditionalGeneration

    cfg = PegasusXConfig(**SEQ2SEQ, **SMALL)
    return PegasusXForConditionalGeneration(cfg)


def nllb_moe():
    from transformers import NllbMoeConfig, NllbMoeForConditionalGeneration

    return NllbMoeForConditionalGeneration(NllbMoeConfig(num_experts=4, **SEQ2SEQ, **SMALL))


SEQ2SEQ = {
    "encoder_layers": 2, "decoder_layers": 2, "d_model": 64, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "max_position_embeddings": 64, "dropout": 0.0, "attention_dropout": 0.0,
    "decoder_start_token_id": 0,
}  # fmt: skip
MODELS = {"gpt2": gpt2, "bert": bert, "llama": llama}
NORMS = {"gpt2": nn.LayerNorm, "bert": nn.LayerNorm, "llama": LlamaRMSNorm}


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls reaching fastdl.scaled_dot_product_attention."""
    count = [0]
    real = A.scaled_dot_product_attention

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(A, "scaled_dot_product_attention", counted)
    return count


def _pair(name):
    torch.manual_seed(0)
    ref = MODELS[name]().train()  # dropout is 0: train mode only exercises the training paths
    patched = copy.deepcopy(ref)
    report = fastdl.patch(patched)
    return ref, patched, report


def _batch():
    ids = torch.randint(3, VOCAB, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, 5:] = 0
    return ids, mask


def _close(got, want):
    # float32 logits within 1e-4 of their scale, relative
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_logits_and_gradients_match(name, padded, calls):
    ref, patched, report = _pair(name)
    norms = [n for n, m in ref.named_modules() if type(m) is NORMS[name]]
    assert {s[0] for s in report.swapped} == {"", *norms} and not report.left, str(report)
    assert patched.config._attn_implementation == "fastdl"
    ids, mask = _batch()
    kwargs = {"input_ids": ids, "attention_mask": mask if padded else None}
    want, got = ref(**kwargs).logits, patched(**kwargs).logits
    assert calls[0] == 2  # every layer's attention ran in fastdl
    keep = mask.bool() if padded else torch.ones_like(ids, dtype=torch.bool)
    _close(got[keep], want[keep])
    g = torch.randn_like(want) * keep[..., None]
    want.backward(g)
    got.backward(g)
    # Floor: the key bias's gradient is zero in exact arithmetic (rounding noise, ~1e-9).
    for (n, a), b in zip(ref.named_parameters(), patched.parameters(), strict=True):
        atol = 1e-6 + 1e-4 * a.grad.abs().max().item()
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=atol, msg=n)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_generation_matches(name):
    ref, patched, _ = _pair(name)
    ref.eval()
    patched.eval()
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, as generation wants
    args = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 12, "do_sample": False}
    want = ref.generate(**args, pad_token_id=2)
    got = patched.generate(**args, pad_token_id=2)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["gpt_oss", "pegasus_x", "nllb_moe"])
def test_models_off_sdpa_are_left(name):
    """transformers keeps these off "sdpa" (GPT-OSS's sinks; PegasusX's and NLLB-MoE's decoders
    want an explicit causal mask, which sdpa's mask function skips): "fastdl" would be wrong."""
    torch.manual_seed(0)
    ref = globals()[name]().eval()
    patched = copy.deepcopy(ref)
    report = fastdl.patch(patched)
    assert "" not in {s[0] for s in report.swapped}, str(report)
    assert "_supports_sdpa is False" in {n: why for n, _, why in report.left}[""]
    assert patched.config._attn_implementation == ref.config._attn_implementation
    ids = _batch()[0]
    kwargs = {"input_ids": ids}
    if ref.config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = ids
    _close(patched(**kwargs).logits, ref(**kwargs).logits)


def gemma4():
    """Gemma 4 with text, vision and audio towers: the audio one is kept off sdpa."""
    from transformers import (
        Gemma4AudioConfig,
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4TextConfig,
        Gemma4VisionConfig,
    )

    heads = {"num_attention_heads": 2, "head_dim": 16}
    cfg = Gemma4Config(
        text_config=Gemma4TextConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_key_value_heads=1, **heads,
        ),
        vision_config=Gemma4VisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_key_value_heads=2,
            **heads,
        ),
        audio_config=Gemma4AudioConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            subsampling_conv_channels=[8, 4], output_proj_dims=32,
        ),
    )  # fmt: skip
    audio_eager = {"": "sdpa", "text_config": "sdpa", "vision_config": "sdpa"}
    audio_eager["audio_config"] = "eager"
    return Gemma4ForConditionalGeneration._from_config(cfg, attn_implementation=audio_eager)


def test_sub_model_off_sdpa_keeps_its_attention():
    """A composite model switches each sub-model on its own config: Gemma 4's text and vision
    towers to "fastdl", its audio tower (kept off sdpa) left on "eager"; unpatch restores each
    (it used to set the root's previous "sdpa" on all three, which the audio tower refuses)."""
    pytest.importorskip("transformers.models.gemma4")
    torch.manual_seed(0)
    ref = gemma4().eval()
    patched = copy.deepcopy(ref)
    report = fastdl.patch(patched)

    def towers(model):
        return [
            getattr(model.config, f"{k}_config")._attn_implementation
            for k in ("text", "vision", "audio")
        ]

    assert towers(patched) == ["fastdl", "fastdl", "eager"]
    assert "_supports_sdpa is False" in {n: why for n, _, why in report.left}["model.audio_tower"]
    ids = _batch()[0]
    _close(patched(input_ids=ids).logits, ref(input_ids=ids).logits)
    fastdl.unpatch(patched)
    assert towers(patched) == ["sdpa", "sdpa", "eager"]
    assert patched.config._attn_implementation == "sdpa"


def test_config_tree_of_unset_sub_configs():
    """The per-sub-config form set_attn_implementation takes; a sub-config never given an
    implementation (None) is a leaf like the others."""
    from types import SimpleNamespace as NS

    leaf = NS(sub_configs={}, _attn_implementation=None)
    root = NS(sub_configs={"audio": None, "text": None}, audio=leaf, text=None)
    root._attn_implementation = "sdpa"
    assert hf._config_tree(root, lambda c: c._attn_implementation) == {"": "sdpa", "audio": None}
    assert hf._config_tree(root, lambda c: "eager") == "eager"


def test_model_without_attention_is_not_switched():
    from transformers import ResNetConfig, ResNetModel

    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1])
    report = fastdl.patch(ResNetModel(cfg))
    assert "" not in {s[0] for s in report.swapped}
    assert "_supports_sdpa is False" in {n: why for n, _, why in report.left}[""]


@pytest.mark.parametrize("name", ["gemma2", "gpt_oss"])
def test_eager_only_features_run_the_models_eager_function(name):
    """Gemma2's softcap and GPT-OSS's sinks, asked for with attn_implementation="fastdl":
    the model's own eager function runs them, on the sdpa masks made additive."""
    torch.manual_seed(0)
    ref = globals()[name]().train()
    model = copy.deepcopy(ref)
    hf._set_attention(ref, "eager")
    hf._set_attention(model, "fastdl")
    ids = _batch()[0]
    # no padding: the full-attention layers get no mask, only is_causal
    _close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    kwargs = {"input_ids": ids, "attention_mask": mask}
    want, got = ref(**kwargs).logits, model(**kwargs).logits
    keep = mask.bool()
    _close(got[keep], want[keep])
    g = torch.randn_like(want) * keep[..., None]
    want.backward(g)
    got.backward(g)
    for (n, a), b in zip(ref.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, msg=n)
    args = {"input_ids": ids[:2], "attention_mask": mask[:2], "max_new_tokens": 8}
    want = ref.eval().generate(**args, do_sample=False, pad_token_id=2)
    assert torch.equal(model.eval().generate(**args, do_sample=False, pad_token_id=2), want)


def test_torch_save_round_trip():
    ref, patched, _ = _pair("llama")
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in patched.modules()]
    ids = _batch()[0]
    torch.testing.assert_close(loaded(input_ids=ids).logits, patched(input_ids=ids).logits)
    fastdl.unpatch(loaded)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in ref.modules()]


def test_attn_implementation_from_config(calls):
    cfg = llama().config
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fastdl")
    assert model.config._attn_implementation == "fastdl"
    model(input_ids=_batch()[0])
    assert calls[0] == cfg.num_hidden_layers


def test_unpatch_restores_the_model():
    ref, patched, _ = _pair("llama")
    params = dict(patched.named_parameters())
    fastdl.unpatch(patched)
    assert patched.config._attn_implementation == "sdpa"
    assert [type(m) for m in patched.modules()] == [type(m) for m in ref.modules()]
    assert all(p is params[n] for n, p in patched.named_parameters())
    ids = _batch()[0]
    torch.testing.assert_close(patched(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert fastdl.patch(patched).swapped  # patchable again


def test_compile_fullgraph_both_ways():
    torch.manual_seed(0)
    ref = llama(layers=1).eval()
    patched = copy.deepcopy(ref)
    fastdl.patch(patched)
    ids = _batch()[0]
    want = ref(input_ids=ids).logits
    for model in (ref, patched):
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True)(input_ids=ids).logits
        _close(out, want)


def test_norm_recognition():
    """LlamaRMSNorm's forward is copied into other models' norms (Qwen2's); T5LayerNorm is a
    second form; Gemma's (1 + weight) norm is another computation and is left."""
    model = nn.ModuleDict(
        {
            "qwen": Qwen2RMSNorm(8, eps=1e-5),
            "t5": T5LayerNorm(8),
            "gemma": GemmaRMSNorm(8),
            "no_eps": LlamaRMSNorm(8),
        }
    )
    model.no_eps.variance_epsilon = 0  # attributes checked, not just the code
    for m in model.values():
        nn.init.normal_(m.weight)
    ref = copy.deepcopy(model)
    report = fastdl.patch(model)
    assert sorted(s[0] for s in report.swapped) == ["qwen", "t5"]
    left = {n: why for n, _, why in report.left}
    assert set(left) == {"gemma", "no_eps"} and "variance_epsilon" in left["no_eps"]
    assert isinstance(model.qwen, Qwen2RMSNorm) and type(model.qwen) is not Qwen2RMSNorm
    x = torch.randn(4, 8, dtype=torch.float64)
    for key in ("qwen", "t5"):
        torch.testing.assert_close(model[key].double()(x), ref[key].double()(x))
    # dtypes fastdl.rms_norm does not give as HF does run HF's forward
    x16 = torch.randn(4, 8, dtype=torch.float16)
    torch.testing.assert_close(model.qwen.float()(x16), ref.qwen.float()(x16))


@pytest.mark.parametrize(
    "case",
    [
        "causal", "bool-mask", "float-mask", "gqa", "decode", "position-bias", "scaling",
        "query-batch-1", "key-batch-1",
    ],
)  # fmt: skip
def test_attention_function_matches_sdpa(case):
    gen = torch.Generator().manual_seed(3)
    b, h, hkv, lq, lk, d = 2, 4, 4, 7, 7, 16
    if case == "gqa":
        hkv = 2
    if case == "decode":
        lq = 1
    module = nn.Module()
    module.is_causal = case in ("causal", "gqa", "decode", "query-batch-1")
    module.num_key_value_groups = h // hkv
    bq, bk = {"query-batch-1": (1, b), "key-batch-1": (b, 1)}.get(case, (b, b))
    q = torch.randn(bq, h, lq, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(bk, hkv, lk, d, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(bk, hkv, lk, d, generator=gen, dtype=torch.float64, requires_grad=True)
    kwargs = {}
    mask = None
    if case == "bool-mask":
        mask = torch.rand(b, 1, lq, lk, generator=gen) > 0.3
        mask[..., 0] = True
    if case == "float-mask":
        mask = torch.randn(b, 1, lq, lk, generator=gen, dtype=torch.float64)
    if case == "position-bias":
        kwargs["position_bias"] = torch.randn(1, h, lq, lk, generator=gen, dtype=torch.float64)
        kwargs["position_bias"].requires_grad_()
        mask = torch.rand(b, 1, lq, lk, generator=gen) > 0.3
        mask[..., 0] = True
    if case == "scaling":
        kwargs["scaling"] = 0.3
    inputs = [q, k, v, *([kwargs["position_bias"]] if "position_bias" in kwargs else [])]
    outs = []
    for fn in (hf.attention_forward, sdpa_attention_forward):
        out, weights = fn(module, q, k, v, mask, **kwargs)
        assert weights is None and out.shape == (b, lq, h, d)
        outs.append((out, *torch.autograd.grad(out.sum(), inputs)))
    for got, want in zip(*outs, strict=True):
        torch.testing.assert_close(got, want)


def test_attention_function_falls_back(calls):
    module = nn.Module()
    q = torch.randn(1, 2, 3, 288)  # head_dim above fastdl's limit: transformers' sdpa runs it
    out, _ = hf.attention_forward(module, q, q, q, None)
    assert calls[0] == 0
    torch.testing.assert_close(out, sdpa_attention_forward(module, q, q, q, None)[0])


def test_attention_function_refuses_what_it_cannot_run():
    module = nn.Module()  # its module (torch.nn's) has no eager_attention_forward
    q = torch.randn(1, 2, 3, 16)
    with pytest.raises(NotImplementedError, match=r"\['softcap'\].*eager"):
        hf.attention_forward(module, q, q, q, None, softcap=30.0)
