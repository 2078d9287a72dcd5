"""Prompt tuning and prefix tuning against HF PEFT on tiny random Llama, GPT-2 and BERT
models: logits, losses and every gradient (fp32, 1e-5 relative) on padded batches, inits,
greedy generate, the prefix fold, and a few training steps."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tests.helpers.numerics import assert_close
from tests.helpers.prompts import (
    MODELS,
    N_VIRTUAL,
    configs,
    encoder_grads,
    generate_positions,
    local_tokenizer,
    padded_batch,
    pair,
    peft,
    tiny_bert_cls,
)

import fastpeft
from fastpeft.methods.prompt.model import ENCODER_NAME, prompt_encoder

F32 = torch.float32


def _compare_step(theirs, ours, peft_encoder, kwargs):
    out_theirs = theirs(**kwargs)
    out_ours = ours(**kwargs)
    assert_close(out_ours.logits, out_theirs.logits, F32, "logits")
    assert_close(out_ours.loss, out_theirs.loss, F32, "loss")
    out_theirs.loss.backward()
    out_ours.loss.backward()
    expected = encoder_grads(peft_encoder)
    got = encoder_grads(prompt_encoder(ours))
    assert got.keys() == expected.keys() and expected
    for name in expected:
        assert_close(got[name], expected[name], F32, f"grad {name}")


@pytest.mark.parametrize(("model_name", "method"), [
    *((model, method) for model in sorted(MODELS) for method in ("prompt", "prefix", "prefix_mlp")),
    ("llama", "ptuning_mlp"), ("gpt2", "ptuning_lstm"),
])
def test_causal_lm_logits_and_grads_match_peft(model_name, method):
    theirs, ours = pair(MODELS[model_name](), method)
    ids, mask, labels = padded_batch()
    kwargs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if method.startswith("prefix"):  # PEFT shifts given position ids past the prefix (prompt tuning drops them)
        kwargs["position_ids"] = generate_positions(mask)
    _compare_step(theirs, ours, theirs.prompt_encoder["default"], kwargs)
    base_grads = [p.grad for name, p in ours.named_parameters() if not name.startswith(ENCODER_NAME)]
    assert all(g is None for g in base_grads)


def test_prompt_tuning_inputs_embeds_and_dropped_ids_match_peft():
    """inputs_embeds instead of ids; position / token type ids dropped with PEFT's warnings."""
    theirs, ours = pair(MODELS["gpt2"](), "prompt")
    ids, mask, labels = padded_batch(seed=3, length=5)
    embeds = ours.get_input_embeddings()(ids).detach()
    kwargs = {"inputs_embeds": embeds, "attention_mask": mask, "labels": labels,
              "position_ids": generate_positions(mask), "token_type_ids": torch.zeros_like(ids)}
    with pytest.warns(UserWarning, match="Position ids are not supported"):
        ours(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _compare_step(theirs, ours, theirs.prompt_encoder["default"], kwargs)


@pytest.mark.parametrize("method", ["prompt", "prefix_mlp"])
def test_bert_sequence_classification_matches_peft(method):
    """Encoder model, SEQ_CLS: virtual tokens, token type ids, the trainable classifier copy.
    PEFT 0.21's prefix SEQ_CLS forward cannot run on transformers 5 (it looks for a
    ``past_key_values`` parameter), so the prefix reference is its ``_prefix_tuning_forward``
    spelled out: the backbone with PEFT's prefix cache, then dropout and the classifier."""
    theirs, ours = pair(tiny_bert_cls(), method, task_type="SEQ_CLS")
    ids, mask, _ = padded_batch(seed=4, length=6)
    types = torch.zeros_like(ids)
    types[:, 3:] = 1
    labels = torch.tensor([0, 2, 1])
    kwargs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}
    if method == "prompt":
        _compare_step(theirs, ours, theirs.prompt_encoder["default"], kwargs)
    else:
        base = theirs.base_model
        cache = theirs.get_prompt(batch_size=3)
        full_mask = torch.cat((torch.ones(3, N_VIRTUAL), mask), dim=1)
        pooled = base.bert(input_ids=ids, attention_mask=full_mask, token_type_ids=types, cache=cache).pooler_output
        logits = base.classifier(base.dropout(pooled))
        loss = torch.nn.functional.cross_entropy(logits, labels)
        out = ours(**kwargs)
        assert_close(out.logits, logits, F32, "logits")
        assert_close(out.loss, loss, F32, "loss")
        loss.backward()
        out.loss.backward()
        expected = encoder_grads(theirs.prompt_encoder["default"])
        for name, grad in encoder_grads(prompt_encoder(ours)).items():
            assert_close(grad, expected[name], F32, f"grad {name}")
    head_theirs = theirs.base_model.classifier.modules_to_save["default"]
    assert_close(ours.classifier.weight.grad, head_theirs.weight.grad, F32, "classifier grad")
    assert ours.classifier.weight.requires_grad and not ours.bert.embeddings.word_embeddings.weight.requires_grad


def test_inits_match_peft(tmp_path):
    """RANDOM, SAMPLE_VOCAB (same RNG draws as PEFT), TEXT from a local tokenizer (saved
    directory by path, or the tokenizer object), and prefix inits with init_weights='zero'."""
    base = MODELS["llama"]()
    tokenizer = local_tokenizer(["the", "movie", "was", "great"])
    tokenizer.save_pretrained(tmp_path)
    text = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "the movie was",
            "tokenizer_name_or_path": str(tmp_path)}
    cases = [("prompt", {}), ("prompt", {"prompt_tuning_init": "SAMPLE_VOCAB"}), ("prompt", text),
             ("prefix", {}), ("prefix_mlp", {"init_weights": "zero"}), ("ptuning_mlp", {}), ("ptuning_lstm", {})]
    for method, extra in cases:
        peft_config, config = configs(method, **extra)
        torch.manual_seed(7)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft_config).prompt_encoder["default"].state_dict()
        torch.manual_seed(7)
        ours = prompt_encoder(fastpeft.inject(copy.deepcopy(base), config)).state_dict()
        assert ours.keys() == theirs.keys(), (method, extra)
        for key in theirs:
            assert torch.equal(ours[key], theirs[key]), (method, extra, key)
    # TEXT: the word embeddings of "the movie was" (ids 1, 2, 3), cycled to N_VIRTUAL rows
    _, config = configs("prompt", **{**text, "tokenizer_name_or_path": tokenizer})
    weight = prompt_encoder(fastpeft.inject(copy.deepcopy(base), config)).embedding.weight
    assert torch.equal(weight, base.get_input_embeddings().weight[[1, 2, 3]])


def _greedy_with_peft_forward(theirs, ids, mask, steps, prefix):
    """Greedy decoding by full forwards of the PEFT model (no cache), with the position
    ids ``generate`` would give (which PEFT's prompt tuning ignores)."""
    for _ in range(steps):
        kwargs = {"position_ids": generate_positions(mask)} if prefix else {}
        with torch.no_grad():
            logits = theirs(input_ids=ids, attention_mask=mask, **kwargs).logits
        ids = torch.cat((ids, logits[:, -1:].argmax(-1)), dim=1)
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
    return ids


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_greedy_generate_matches_peft(model_name, method):
    """generate, with the KV cache (the prefix given through it) and without, equals greedy
    decoding by PEFT's forward. (PEFT 0.21's own generate is no reference on transformers 5:
    its prepare_inputs_for_generation looks for ``past_key_values`` / ``cache_position``,
    which generate no longer passes, so it re-prepends the prompts at every decode step or
    passes a prefix the model ignores.)"""
    theirs, ours = pair(MODELS[model_name](seed=2), method)
    for model in (ours, theirs.base_model):
        model.generation_config.eos_token_id = None
    ids, mask, _ = padded_batch(seed=5, length=5)
    ids, mask = ids[[0, 2]], mask[[0, 2]]  # left padding (as generate wants) and none
    expected = _greedy_with_peft_forward(theirs, ids, mask, 6, prefix=method != "prompt")
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # generate's position ids are dropped silently
        cached = ours.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(cached, expected)
    assert torch.equal(ours.generate(input_ids=ids, attention_mask=mask, use_cache=False, **settings), expected)


def test_forward_continues_from_returned_cache():
    """A forward given the cache an earlier call returned adds no second prefix: two
    chunks give the logits of one forward over both."""
    _, ours = pair(MODELS["llama"](), "prefix")
    ids, mask, _ = padded_batch(seed=6, length=6)
    with torch.no_grad():
        whole = ours(input_ids=ids, attention_mask=mask).logits
        first = ours(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        second = ours(input_ids=ids[:, 4:], attention_mask=mask, cache=first.cache).logits
    assert_close(torch.cat((first.logits, second), dim=1)[2:], whole[2:], F32, "chunked logits")


@pytest.mark.parametrize("method", ["prefix_mlp", "ptuning_lstm"])
def test_merge_prefix_folds_the_mlp(method):
    _, ours = pair(MODELS["gpt2"](), method)
    ids, mask, _ = padded_batch(seed=8)
    encoder = prompt_encoder(ours)
    with torch.no_grad():
        before = ours(input_ids=ids, attention_mask=mask).logits
        stored = (encoder.prefix() if method == "prefix_mlp" else encoder.prompts()).clone()
    assert fastpeft.merge_prefix(ours) is ours
    assert not any(hasattr(encoder, head) for head in ("transform", "mlp_head", "lstm_head"))
    assert torch.equal(encoder.embedding.weight, stored) and encoder.embedding.weight.requires_grad
    with torch.no_grad():
        assert_close(ours(input_ids=ids, attention_mask=mask).logits, before, F32, "merged logits")
    with pytest.raises(ValueError, match="prompt tuning"):
        fastpeft.merge_prefix(pair(MODELS["gpt2"](), "prompt")[1])
    with pytest.raises(ValueError, match="no fastpeft prompt"):
        fastpeft.merge_prefix(MODELS["gpt2"]())


@pytest.mark.parametrize("method", ["prompt", "prefix_mlp", "ptuning_mlp"])
def test_training_steps_follow_peft(method):
    """AdamW steps from the same weights: the same losses as PEFT's, and they fall."""
    theirs, ours = pair(MODELS["llama"](), method)
    ids, mask, labels = padded_batch(seed=9)
    losses = []
    for model in (theirs, ours):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=0.05)
        run = []
        for _ in range(4):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[1][-1] < losses[1][0]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_bf16_model_keeps_fp32_virtual_tokens(method):
    """On a bf16 model the virtual-token weights and their gradients stay float32 (PEFT's
    choice); logits equal PEFT's, gradients to bf16 rounding (PEFT sums the batch in bf16
    copies, fastpeft through one broadcast)."""
    theirs, ours = pair(MODELS["llama"]().to(torch.bfloat16), method)
    ids, mask, labels = padded_batch(seed=10)
    out_theirs = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    out_ours = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(out_ours.logits, out_theirs.logits)
    out_theirs.loss.backward()
    out_ours.loss.backward()
    weight = prompt_encoder(ours).embedding.weight
    assert weight.dtype == weight.grad.dtype == F32
    assert_close(weight.grad, theirs.prompt_encoder["default"].embedding.weight.grad, torch.bfloat16, "grad")
