"""Tokenizing in 75-token chunks and encoding with SD1 / SD2 / SDXL tiny text encoders."""
from __future__ import annotations

import pytest
import torch

from library.sd_configs import CLIP_BOS_ID as BOS, CLIP_EOS_ID as EOS, make_clip_tokenizer
from library.text_encoding import chunk_count, count_tokens, encode_tokens, join_chunks, tokenize, tokenize_weighted
from tests.conftest import tiny_models

A = 320  # "a</w>" in the CLIP vocabulary; the tiny tokenizer has one token per character


@pytest.fixture(scope="module")
def clip_tok():
    return make_clip_tokenizer("clip")


@pytest.fixture(scope="module")
def openclip_tok():
    return make_clip_tokenizer("openclip")


def words(n: int) -> str:
    return " ".join(["a"] * n)  # n tokens


def test_chunk_count():
    assert [chunk_count(x) for x in (None, 75, 150, 225, 375)] == [1, 1, 2, 3, 5]  # > 225: generation prompts
    with pytest.raises(ValueError, match="expected a multiple of 75"):
        chunk_count(100)


def test_single_chunk_layout(clip_tok, openclip_tok):
    ids = tokenize(clip_tok, "a a a")
    assert ids.shape == (1, 77)
    assert ids[0, :5].tolist() == [BOS, A, A, A, EOS] and set(ids[0, 5:].tolist()) == {EOS}  # pad = EOS
    ids = tokenize(openclip_tok, "a a a")
    assert ids[0, :5].tolist() == [BOS, A, A, A, EOS] and set(ids[0, 5:].tolist()) == {0}  # pad = "!"
    long = tokenize(clip_tok, words(100))  # truncated to 75 tokens, closed with EOS
    assert long[0, 75].item() == A and long[0, 76].item() == EOS


def test_three_chunks_with_bos_eos_each(clip_tok, openclip_tok):
    for tok, pad in ((clip_tok, EOS), (openclip_tok, 0)):
        ids = tokenize(tok, words(100), max_token_length=225)
        assert ids.shape == (1, 231)
        c = ids.reshape(3, 77)
        assert c[:, 0].tolist() == [BOS] * 3
        assert c[0, 1:76].tolist() == [A] * 75 and c[0, 76].item() == EOS  # full chunk closed with EOS
        assert c[1, 1:26].tolist() == [A] * 25 and c[1, 26].item() == EOS and set(c[1, 27:].tolist()) == {pad}
        assert c[2, 1].item() == EOS and set(c[2, 2:].tolist()) == {pad}  # chunk past the text: <BOS> <EOS> pad
    over = tokenize(clip_tok, words(300), max_token_length=150).reshape(2, 77)
    assert over[1, 1:76].tolist() == [A] * 75 and over[1, 76].item() == EOS  # cut at 150 tokens


def test_pad_like_text_token_is_not_padding(openclip_tok):
    ids = tokenize(openclip_tok, "!" * 75, max_token_length=150).reshape(2, 77)  # "!" has the pad id 0
    assert set(ids[0, 1:76].tolist()) <= {0, 256} and ids[0, 75].item() == 0 and ids[0, 76].item() == EOS
    assert ids[1, 1].item() == EOS and set(ids[1, 2:].tolist()) == {0}


def test_batch_and_count(clip_tok):
    ids = tokenize(clip_tok, ["a", words(80)], max_token_length=150)
    assert ids.shape == (2, 154)
    assert count_tokens(clip_tok, words(80)) == 80


def test_weighted_tokens(clip_tok):
    ids, w = tokenize_weighted(clip_tok, "a (b:1.5) [c]")
    plain = tokenize(clip_tok, "a b c")
    assert torch.equal(ids, plain)
    assert w[0, :5].tolist() == pytest.approx([1.0, 1.0, 1.5, 1 / 1.1, 1.0])
    assert (w[0, 5:] == 1).all()


def test_join_chunks_keeps_first_bos_and_last_position():
    x = torch.arange(2 * 154).reshape(2, 154, 1).float()
    y = join_chunks(x)
    assert y.shape == (2, 152, 1)
    assert y[0, 0, 0] == 0 and y[0, 1:76, 0].tolist() == list(range(1, 76))
    assert y[0, 76:151, 0].tolist() == list(range(78, 153)) and y[0, 151, 0] == 153


def test_encode_sd1_shapes_and_clip_skip():
    m = tiny_models("sd1")
    te = m.text_encoders[0]
    ids = tokenize(m.tokenizers[0], ["a frog", "b"])
    h, pooled = encode_tokens(m.text_encoders, [ids])
    assert pooled is None and h.shape == (2, 77, 32)
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
        assert torch.allclose(h, out.last_hidden_state, atol=1e-6)
        h2, _ = encode_tokens(te, ids, clip_skip=2)
        assert torch.allclose(h2, te.final_layer_norm(out.hidden_states[-2]), atol=1e-6)
    assert not torch.allclose(h, h2)


def test_encode_long_prompt_joins_chunks():
    m = tiny_models("sd1")
    tok, te = m.tokenizers[0], m.text_encoders[0]
    ids = tokenize(tok, words(90), max_token_length=150)
    h, _ = encode_tokens(te, ids, max_token_length=150)
    assert h.shape == (1, 152, 32)
    with torch.no_grad():
        first = te(ids[:, :77]).last_hidden_state
        second = te(ids[:, 77:]).last_hidden_state
    assert torch.allclose(h[:, :76], first[:, :76], atol=1e-6)
    assert torch.allclose(h[:, 76:151], second[:, 1:76], atol=1e-6)
    assert torch.allclose(h[:, 151], second[:, 76], atol=1e-6)


def test_encode_sd2_uses_last_layer_of_its_encoder():
    m = tiny_models("sd2")
    ids = tokenize(m.tokenizers[0], "a frog", max_token_length=225)
    h, pooled = encode_tokens(m.text_encoders, [ids])
    assert h.shape == (1, 227, 40) and pooled is None


def test_encode_sdxl_concat_and_pooled():
    m = tiny_models("sdxl")
    te1, te2 = m.text_encoders
    ids = [tokenize(t, ["a frog", words(80)], max_token_length=150) for t in m.tokenizers]
    h, pooled = encode_tokens(m.text_encoders, ids, sdxl=True, tokenizers=m.tokenizers)
    assert h.shape == (2, 152, 32 + 40) and pooled.shape == (2, 24)
    with torch.no_grad():
        h1 = te1(ids[0][:, :77], output_hidden_states=True).hidden_states[-2]
        out2 = te2(ids[1][:, :77], output_hidden_states=True)
    assert torch.allclose(h[:, :76, :32], h1[:, :76], atol=1e-5)
    assert torch.allclose(h[:, :76, 32:], out2.hidden_states[-2][:, :76], atol=1e-5)
    assert torch.allclose(pooled, out2.text_embeds, atol=1e-5)  # first chunk's EOS, projected


def test_weighted_encoding_restores_mean():
    m = tiny_models("sd1")
    tok, te = m.tokenizers[0], m.text_encoders[0]
    ids, w = tokenize_weighted(tok, ["a (frog:1.5) b"])
    plain, _ = encode_tokens(te, ids)
    ones, _ = encode_tokens(te, ids, weights=torch.ones_like(w))
    weighted, _ = encode_tokens(te, ids, weights=w)
    assert torch.allclose(ones, plain, atol=1e-6)
    assert torch.allclose(weighted.mean(), plain.mean(), atol=1e-5)
    ratio = (weighted[0, 3] / plain[0, 3]) / (weighted[0, 1] / plain[0, 1])  # "frog" token vs "a"
    assert torch.allclose(ratio, torch.full_like(ratio, 1.5), atol=1e-4)


def test_weighting_a_zero_mean_hidden_state_stays_finite():
    from library.text_encoding import _apply_weights

    hidden = torch.randn(1, 77, 8)
    hidden = hidden - hidden.mean()  # a bias-free layer norm's output has mean 0: nothing to restore
    weights = torch.ones(1, 77)
    weights[0, 3] = 2.0
    out = _apply_weights(hidden, weights)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0, 3], 2 * hidden[0, 3]) and torch.allclose(out[0, 4], hidden[0, 4])


def test_wrong_input_length_is_an_error():
    m = tiny_models("sd1")
    with pytest.raises(ValueError, match="multiple of 77"):
        encode_tokens(m.text_encoders[0], torch.zeros(1, 80, dtype=torch.long))


def test_break_closes_the_chunk_in_prompts_only(clip_tok, openclip_tok):
    for tok in (clip_tok, openclip_tok):
        ids, w = tokenize_weighted(tok, "a a BREAK (b:1.5) c", 225, breaks=True)
        alone = [tokenize(tok, t) for t in ("a a", "b c")]
        assert torch.equal(ids, torch.cat([*alone, tokenize(tok, "")], dim=1))  # third chunk: past the text
        assert w[0, 77:81].tolist() == pytest.approx([1.0, 1.5, 1.0, 1.0])
    # a full chunk then BREAK: no empty chunk in between; BREAK BREAK: an empty one; BREAKFAST is a word
    ids, _ = tokenize_weighted(clip_tok, words(75) + " BREAK b", 150, breaks=True)
    assert torch.equal(ids, torch.cat([tokenize(clip_tok, words(75)), tokenize(clip_tok, "b")], dim=1))
    ids, _ = tokenize_weighted(clip_tok, "a BREAK BREAK b", 225, breaks=True)
    assert torch.equal(ids, torch.cat([tokenize(clip_tok, t) for t in ("a", "", "b")], dim=1))
    assert torch.equal(tokenize_weighted(clip_tok, "a BREAKFAST", breaks=True)[0], tokenize(clip_tok, "a BREAKFAST"))
    # chunks past the limit are cut; training captions keep BREAK as text
    ids, _ = tokenize_weighted(clip_tok, "a BREAK b BREAK c", 150, breaks=True)
    assert torch.equal(ids, torch.cat([tokenize(clip_tok, "a"), tokenize(clip_tok, "b")], dim=1))
    assert torch.equal(tokenize_weighted(clip_tok, "a BREAK b")[0], tokenize(clip_tok, "a BREAK b"))


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_sample_and_generation_prompts_encode_break_as_a_new_chunk(arch):
    """library.sampling.encode_prompts (training samples and the generation scripts) honours BREAK."""
    from library.sampling import encode_prompts

    m = tiny_models(arch)
    with torch.no_grad():
        hidden, pooled = encode_prompts(m, ["a cat BREAK a dog"], torch.device("cpu"), max_embeddings_multiples=2)
        ids = [torch.cat([tokenize(t, "a cat"), tokenize(t, "a dog")], dim=1) for t in m.tokenizers]
        expected, expected_pooled = encode_tokens(m.text_encoders, ids, None, m.is_sdxl, tokenizers=m.tokenizers)
        as_text, _ = encode_prompts(m, ["a cat a dog"], torch.device("cpu"), max_embeddings_multiples=2)
    assert torch.equal(hidden, expected) and hidden.shape[1] == 152
    assert not torch.allclose(hidden, as_text)
    if arch == "sdxl":
        assert torch.equal(pooled, expected_pooled)
