"""RoSTE's rotations on the real model (hidden 576 = 9 x 2^6, 9 heads of 64, 3 KV heads,
intermediate 1536 = 12 x 2^7, a tied head) leave the float model's function unchanged."""

import pytest
import torch

import fastft


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.pretrained
def test_rotations_without_quantizers_give_the_original_logits(smollm2):
    ids, _ = smollm2.batch(2, 96, skip=4)
    want = logits(smollm2.model, ids)
    model = smollm2.fresh()
    method = fastft.RoSTE(rotations="all", quantize=False)
    fastft.prepare(model, method)
    assert method.chosen == {k: list(range(30)) for k in ("r2", "r3", "r4")}
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied
    assert not model.config.tie_word_embeddings
    emb, emb0 = model.model.embed_tokens.weight, smollm2.model.model.embed_tokens.weight
    assert (emb - emb0).abs().max() > 1e-2 * emb0.abs().max()  # R1 is merged into them
    assert torch.all(model.model.layers[0].input_layernorm.weight == 1)  # folded
    got = logits(model, ids)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, err  # measured 2.6e-6 of the largest logit
    assert torch.equal(got.argmax(-1), want.argmax(-1))
