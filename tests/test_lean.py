"""osd.lean: LLaMA's RMSNorm and SwiGLU MLP with fewer saved tensors give the same forward
values, bit for bit, gradients equal to rounding, and save what the docstring says."""

import copy
import pickle
import warnings

import pytest
import torch

from osd import lean

transformers = pytest.importorskip("transformers")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def llama(dtype, size="llama_9m", **overrides):
    from osd.models import model_config

    torch.manual_seed(0)
    config = model_config(size)
    for key, value in overrides.items():
        setattr(config, key, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(config).to(DTYPES[dtype])


def loss_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def saved_bytes(model, ids) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def keep(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_forward_close_gradients(dtype):
    ids = torch.randint(0, 32000, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = llama(dtype)
    model = copy.deepcopy(ref)
    layers = ref.config.num_hidden_layers
    assert lean.apply(model) == 3 * layers + 1  # 2 norms and an MLP per layer, the final norm
    assert lean.apply(model) == 0  # already lean
    ref_logits, ref_grads = loss_and_grads(ref, ids)
    logits, grads = loss_and_grads(model, ids)
    assert torch.equal(logits, ref_logits)
    for name, g in grads.items():
        err = ((g.float() - ref_grads[name].float()).norm() / ref_grads[name].float().norm()).item()
        assert err < (1e-5 if dtype == "float32" else 1e-2), (name, err)


@pytest.mark.parametrize("dtype", DTYPES)
def test_saves_a_norms_fp32_copy_and_silu_less(dtype):
    """Per token: 4 h bytes less per RMSNorm (2 per layer, and the final one) and e i less
    per MLP, exactly."""
    ids = torch.randint(0, 32000, (2, 40), generator=torch.Generator().manual_seed(0))
    model = llama(dtype)
    before = saved_bytes(model, ids)
    lean.apply(model)
    after = saved_bytes(model, ids)
    cfg, e, tokens = model.config, torch.finfo(DTYPES[dtype]).bits // 8, ids.numel()
    norms = 2 * cfg.num_hidden_layers + 1
    # bf16: the fp32 copy (4h) less the input (2h) kept instead, plus the normalised input
    # (2h); fp32: the copy is the input itself, so the normalised input (4h)
    expected = tokens * (norms * 4 * cfg.hidden_size + cfg.num_hidden_layers * e * cfg.intermediate_size)
    assert before - after == expected


def test_state_dict_pickle_and_other_activations():
    model = llama("float32")
    keys = list(model.state_dict())
    lean.apply(model)
    assert list(model.state_dict()) == keys
    assert type(model.model.norm).__name__ == "LeanLlamaRMSNorm"
    assert isinstance(model.model.norm, transformers.models.llama.modeling_llama.LlamaRMSNorm)
    clone = pickle.loads(pickle.dumps(model))
    ids = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(clone(input_ids=ids).logits, model(input_ids=ids).logits)
    gelu = llama("float32", hidden_act="gelu")
    assert lean.apply(gelu) == 2 * gelu.config.num_hidden_layers + 1  # norms only: the MLP is not SwiGLU
    assert type(gelu.model.layers[0].mlp).__name__ == "LlamaMLP"


def _loss_case(dtype, n=37, h=16, vocab=50):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(vocab, h, generator=gen).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[[3, 10, n - 1]] = -100  # ignored, as a sequence's last position and padding are
    return hidden, weight, targets


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
def test_chunked_cross_entropy_equals_the_whole_loss(dtype, chunk):
    """The trainer's chunked head and loss: F.cross_entropy's value and gradients (to
    rounding; the loss's incoming gradient scales them), any chunk size, -100 ignored; no
    gradient buffers under no_grad."""
    hidden, weight, targets = _loss_case(DTYPES[dtype])
    torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight).float(), targets, reduction="sum").div(
        7
    ).backward()
    want = (hidden.grad, weight.grad)
    hidden.grad = weight.grad = None
    loss = lean.chunked_cross_entropy(hidden, weight, targets, chunk)
    loss.div(7).backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=2e-2, atol=1e-2)
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(
            torch.nn.functional.linear(hidden, weight).float(), targets, reduction="sum"
        )
        torch.testing.assert_close(lean.chunked_cross_entropy(hidden, weight, targets, chunk), ref)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, want[0], **tol)
    torch.testing.assert_close(weight.grad, want[1], **tol)
    assert hidden.grad.dtype == weight.grad.dtype == DTYPES[dtype]


def test_chunked_cross_entropy_under_autocast():
    """fp32 master weights under bf16 autocast: bf16 matmuls as autocast's linear, fp32
    gradients for the fp32 leaves."""
    hidden, weight, targets = _loss_case(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.cross_entropy(
            torch.nn.functional.linear(hidden, weight).float(), targets, reduction="sum"
        )
        loss = lean.chunked_cross_entropy(hidden, weight, targets, 8)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32


@pytest.mark.parametrize("chunk", [0, -1, 2.5, True])
def test_chunked_cross_entropy_bad_chunk(chunk):
    hidden, weight, targets = _loss_case(torch.float32)
    with pytest.raises(ValueError, match="chunk must be a positive number of token positions, got"):
        lean.chunked_cross_entropy(hidden, weight, targets, chunk)
