"""The memory estimator (osd.memory, osd-memory) against what training really allocates."""

import json
import sys
import warnings

import pytest
import torch

import osd
import osd.lean
from osd.memory import estimate, main

transformers = pytest.importorskip("transformers")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def llama(size="llama_9m", dtype="float32"):
    from osd.models import model_config

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM(model_config(size)).to(DTYPES[dtype])
    osd.lean.apply(model)  # as osd-train's models
    return model


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def tokens(batch, seq):
    return torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(0))


# (estimator arguments, optimizer factory); the estimator's defaults are osd-train's (AdamW on
# P, no correction), the library's SGD on P and Fira's correction
NONE = dict(correction="none")
CASES = {
    "adamw": (dict(optimizer="adamw"), lambda m: osd.AdamW(m.parameters())),
    "adamw8bit": (dict(optimizer="adamw8bit"), lambda m: osd.AdamW8bit(m.parameters())),
    "galore": (
        dict(optimizer="galore", rank=32),
        lambda m: osd.AdamW(osd.param_groups(m, 32, projector="svd", **NONE)),
    ),
    "galore8bit": (
        dict(optimizer="galore", rank=32, eight_bit=True),
        lambda m: osd.AdamW8bit(osd.param_groups(m, 32, projector="svd", **NONE)),
    ),
    **{
        f"osd_{po}": (
            dict(optimizer="osd", rank=32, proj_optimizer=po),
            lambda m, po=po: osd.AdamW(osd.param_groups(m, 32, proj_optimizer=po, **NONE)),
        )
        for po in ("adamw", "adam8bit", "lion", "adafactor", "sgd")
    },
    **{
        f"{name}_bf16_bases": (
            dict(optimizer=name, rank=32, basis_dtype="bfloat16", eight_bit=name == "osd"),
            lambda m, name=name: (osd.AdamW8bit if name == "osd" else osd.AdamW)(
                osd.param_groups(
                    m,
                    32,
                    projector="svd" if name == "galore" else "online_pca",
                    basis_dtype="bfloat16",
                    proj_optimizer="adamw",
                    **NONE,
                )
            ),
        )
        for name in ("galore", "osd")
    },
    "osd8bit": (
        dict(optimizer="osd", rank=32, eight_bit=True, proj_optimizer="adam8bit"),
        lambda m: osd.AdamW8bit(osd.param_groups(m, 32, proj_optimizer="adam8bit", **NONE)),
    ),
    "osd_library_defaults": (
        dict(optimizer="osd", rank=32, proj_optimizer="sgd", correction="fira"),
        lambda m: osd.AdamW(osd.param_groups(m, 32)),
    ),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_weights_gradients_and_state_are_exact(case, dtype):
    kwargs, make = CASES[case]
    model = llama(dtype=dtype)
    optimizer = make(model)
    ids = tokens(2, 32)
    model(input_ids=ids, labels=ids).loss.backward()
    est = estimate("llama_9m", dtype=dtype, **kwargs)
    assert est.weights == nbytes(model.parameters())
    assert est.gradients == nbytes(p.grad for p in model.parameters())
    optimizer.step()
    assert est.optimizer_state == optimizer.state_bytes()


@pytest.mark.parametrize("accumulation", [1, 3])
@pytest.mark.parametrize("subspace", [False, True])
def test_per_layer_gradients_are_the_live_peak(subspace, accumulation):
    """Largest sum of live .grad tensors and projected accumulators while osd.Layerwise
    updates in backward, against the estimator's gradient row."""
    model = llama()
    params = list(model.parameters())
    peak = 0
    optimizer = None

    def live():
        accum = [s["accum"] for s in optimizer.state.values() if "accum" in s]
        return nbytes(p.grad for p in params if p.grad is not None) + nbytes(accum)

    def watch(p):  # runs before Layerwise's hook (registered later), while p.grad is whole
        nonlocal peak
        peak = max(peak, live())

    handles = [p.register_post_accumulate_grad_hook(watch) for p in params]
    groups = osd.param_groups(model, 32) if subspace else params
    optimizer = osd.Layerwise(osd.AdamW(groups), accumulation)
    for _ in range(2):
        for _ in range(accumulation):
            ids = tokens(2, 32)
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    for h in handles:
        h.remove()
    kwargs = dict(optimizer="osd", rank=32) if subspace else dict(optimizer="adamw")
    est = estimate("llama_9m", dtype="float32", per_layer=True, gradient_accumulation=accumulation, **kwargs)
    assert est.gradients == peak
    assert est.gradients < estimate("llama_9m", dtype="float32", **kwargs).gradients or (
        accumulation > 1 and not subspace
    )


class SavedBytes(dict):
    """Bytes of the non-parameter storages handed to it (storage pointer -> bytes); as a
    context, of every tensor autograd saves."""

    def __init__(self, model):
        super().__init__()
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def keep(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            self[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.keep, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


@pytest.mark.parametrize(
    "size,dtype,batch,seq",
    [("llama_9m", "float32", 2, 128), ("llama_9m", "bfloat16", 3, 64), ("llama_20m", "bfloat16", 2, 96)],
)
def test_saved_activations_match_autograd(size, dtype, batch, seq):
    """What autograd saves in the forward pass of the trainer's loss (osd.train.TokenLoss:
    the logits are not held, their fp32 log-softmax is) equals the estimator's activations
    minus the backward transient, to 4 bytes."""
    from osd import train

    model = llama(size, dtype)
    ids = tokens(batch, seq)
    with SavedBytes(model) as saved:
        train.TokenLoss(model)(ids, ids)
    est = estimate(size, dtype=dtype, batch_size=batch, seq_len=seq)
    transient = dict(est.details["activations"])["transient: max(fp32 loss buffers, one layer's backward)"]
    # autograd also keeps one 4-byte scalar of the loss (the token count's reciprocal)
    assert 0 <= sum(saved.values()) - (est.activations - transient) <= 4


@pytest.mark.parametrize("dtype,chunk", [("float32", 40), ("bfloat16", 100)])
def test_a_chunked_loss_saves_no_logits(dtype, chunk):
    """The trainer's loss in chunks (osd.train.TokenLoss, osd.lean.chunked_cross_entropy):
    what autograd saves equals the estimate with ``loss_chunk`` less its transient, to 4
    bytes (no logits, no head input); what stays for backward besides is the two gradient
    buffers the transient counts."""
    from osd import train

    model = llama("llama_9m", dtype)
    ids = tokens(2, 128)
    with SavedBytes(model) as saved:
        loss = train.TokenLoss(model, chunk)(ids, ids)
    est = estimate("llama_9m", dtype=dtype, batch_size=2, seq_len=128, loss_chunk=chunk)
    activations = dict(est.details["activations"])
    assert "head: final norm, ids" in activations
    transient = activations["transient: max(the head's gradients and one chunk's logits, one layer's backward)"]
    assert 0 <= sum(saved.values()) - (est.activations - transient) <= 4
    grad_hidden, grad_weight = loss.grad_fn.grads
    e = torch.finfo(DTYPES[dtype]).bits // 8
    assert grad_hidden.nbytes == 2 * 128 * model.config.hidden_size * e
    assert grad_weight.nbytes == model.lm_head.weight.nbytes
    assert est.activations < estimate("llama_9m", dtype=dtype, batch_size=2, seq_len=128).activations


def _bench(name="memory"):
    """bench/<name>.py as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


AllocatedPeak = _bench("configs").AllocatedPeak  # the allocation-tracking dispatch mode


# name: (optimizer class, group options, estimator's eight_bit, P's optimizer or None for GaLore)
UPDATES = {
    "galore": (osd.AdamW, {"projector": "svd"}, False, None),
    "galore8": (osd.AdamW8bit, {"projector": "svd"}, True, None),
    "galore8_bf16_bases": (osd.AdamW8bit, {"projector": "svd", "basis_dtype": "bfloat16"}, True, None),
    "osd": (osd.AdamW, {}, False, "adamw"),
    "osd_sgd": (osd.AdamW, {"proj_optimizer": "sgd"}, False, "sgd"),
    "osd8": (osd.AdamW8bit, {}, True, "adamw"),
    "osd8_adam8": (osd.AdamW8bit, {"proj_optimizer": "adam8bit"}, True, "adam8bit"),
    "osd8_sgd": (osd.AdamW8bit, {"proj_optimizer": "sgd"}, True, "sgd"),
    "osd8_adam8_bf16_bases": (
        osd.AdamW8bit,
        {"proj_optimizer": "adam8bit", "basis_dtype": "bfloat16"},
        True,
        "adam8bit",
    ),
    "osd_fira": (osd.AdamW, {"correction": "fira"}, False, "adamw"),
    "osd_apollo": (osd.AdamW, {"correction": "apollo"}, False, "adamw"),
    "galore8_apollo_mini": (osd.AdamW8bit, {"projector": "svd", "correction": "apollo_mini"}, True, None),
    "osd_defaults": (osd.AdamW, {"correction": "fira", "proj_optimizer": "sgd"}, False, "sgd"),
    "osd8_defaults": (osd.AdamW8bit, {"correction": "fira", "proj_optimizer": "sgd"}, True, "sgd"),
    "osd8_adam8_fira_bf16_bases": (
        osd.AdamW8bit,
        {"correction": "fira", "proj_optimizer": "adam8bit", "basis_dtype": "bfloat16"},
        True,
        "adam8bit",
    ),
}


def _update_case(update):
    """UPDATES[update] with its group's options made explicit (no correction, the named P
    optimizer) where it gives none."""
    cls, group, eight_bit, proj_optimizer = UPDATES[update]
    group = {"correction": "none", **({"proj_optimizer": proj_optimizer} if proj_optimizer else {}), **group}
    return cls, group, eight_bit, proj_optimizer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("update", UPDATES)
def test_update_temporaries_bound_what_a_step_allocates(update, dtype):
    """osd.memory.update_temporaries against the peak of what one steady-state step of one
    matrix allocates (an allocation-tracking dispatch mode), at LLaMA's MLP and attention
    aspect ratios (2.69 and 1) and ranks where each phase of the update is the peak: never
    below, at most 12% above."""
    _check_update_temporaries(update, dtype, "lone")


# where the step reuses the gradient's buffer for the m x n update: a correction's under
# osd.Layerwise, and every stack's (a copy of the gradients)
REUSING = [
    ("layerwise", "osd_fira"),
    ("layerwise", "osd_apollo"),
    ("layerwise", "galore8_apollo_mini"),
    ("layerwise", "osd8_adam8_fira_bf16_bases"),
    ("stacked", "galore"),
    ("stacked", "osd_sgd"),
    ("stacked", "osd8_adam8"),
    ("stacked", "osd_defaults"),
    ("stacked", "osd_apollo"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("mode", "update"), REUSING)
def test_update_temporaries_where_the_gradient_is_reused(mode, update, dtype):
    """The same where the update is made in the gradient's buffer: a correction's under
    osd.Layerwise (``scratch``), a stack of two matrices' (``stacked``; twice one's)."""
    _check_update_temporaries(update, dtype, mode)


def _check_update_temporaries(update, dtype, mode):
    from osd.memory import update_temporaries

    cls, group, eight_bit, proj_optimizer = _update_case(update)
    k = 2 if mode == "stacked" else 1
    for shape, rank in (((512, 1376), 128), ((512, 512), 256), ((1024, 512), 32)):
        # on the meta device: what a step allocates does not depend on the values
        ws = [torch.nn.Parameter(torch.randn(shape, device="meta", dtype=DTYPES[dtype])) for _ in range(k)]
        opt = cls([{"params": ws, "rank": rank, **group}], lr=1e-3)
        layerwise = osd.Layerwise(opt) if mode == "layerwise" else None
        for _ in range(3):  # the last is a steady-state step
            for w in ws:
                w.grad = torch.randn(shape, device="meta", dtype=DTYPES[dtype])
            with AllocatedPeak() as allocated:
                if layerwise:  # what backward's hook does
                    layerwise._hook(ws[0])
                    layerwise.step()
                else:
                    opt.step()
        e = torch.finfo(DTYPES[dtype]).bits // 8
        correction = group.get("correction", "none")
        basis_dtype = group.get("basis_dtype", "float32")
        one = update_temporaries(
            shape, e, rank, eight_bit, correction, proj_optimizer, basis_dtype, k > 1, scratch=mode == "layerwise"
        )
        assert 0.99 * allocated.peak <= k * one <= 1.12 * allocated.peak, (shape, rank, k * one, allocated.peak)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("update", [k for k, v in UPDATES.items() if v[2]])
def test_chunked_8bit_rule_temporaries(update, dtype, monkeypatch):
    """With chunks of 16k values, the 8-bit rule of a subspace update holds one chunk of
    temporaries (the estimator follows; never below, at most 12% above), and its numbers
    are those of one pass."""
    from osd.memory import update_temporaries

    cls, group, eight_bit, proj_optimizer = _update_case(update)
    shape, rank = (512, 1376), 128
    runs = []
    for chunk in (1 << 22, 1 << 14):
        monkeypatch.setattr(osd.engine, "CHUNK_ELEMENTS", chunk)
        monkeypatch.setattr(osd.memory, "CHUNK_ELEMENTS", chunk)
        gen = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(DTYPES[dtype]))
        opt = cls([{"params": [w], "rank": rank, **group}], lr=1e-3)
        for _ in range(3):
            w.grad = torch.randn(shape, generator=gen).to(DTYPES[dtype])
            with AllocatedPeak() as allocated:
                opt.step()
        runs.append(w.detach().clone())
        e = torch.finfo(DTYPES[dtype]).bits // 8
        basis_dtype = group.get("basis_dtype", "float32")
        est = update_temporaries(shape, e, rank, eight_bit, group["correction"], proj_optimizer, basis_dtype)
        assert 0.99 * allocated.peak <= est <= 1.12 * allocated.peak, (chunk, est, allocated.peak)
    if dtype == "float32" or group["correction"] == "none":
        assert torch.equal(runs[0], runs[1])
    else:  # the chunked update is kept in bf16: a correction's ratio sees it rounded
        differ = (runs[0] != runs[1]).float().mean().item()
        assert differ < 0.05, differ  # measured: 0.9-2.0% of the weights, by one or two bf16 ulps
        torch.testing.assert_close(runs[0], runs[1], rtol=1.6e-2, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_8bit_update_temporaries_are_one_chunks(dtype, monkeypatch):
    """A plain 8-bit update allocates what osd.memory says per value of one chunk, however
    large the tensor (here 4 chunks)."""
    from osd.memory import update_temporaries

    monkeypatch.setattr(osd.engine, "CHUNK_ELEMENTS", 1 << 16)
    monkeypatch.setattr(osd.memory, "CHUNK_ELEMENTS", 1 << 16)
    w = torch.nn.Parameter(torch.randn(256, 1024).to(DTYPES[dtype]))
    opt = osd.AdamW8bit([w], lr=1e-3)
    for _ in range(3):
        w.grad = torch.randn(256, 1024).to(DTYPES[dtype])
        with AllocatedPeak() as allocated:
            opt.step()
    est = update_temporaries((256, 1024), torch.finfo(DTYPES[dtype]).bits // 8, eight_bit=True)
    assert allocated.peak <= est <= 1.05 * allocated.peak, (est, allocated.peak)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "kwargs,optimizer,per_layer",
    [
        (dict(optimizer="adamw"), "adamw", False),
        (dict(optimizer="osd", rank=128), "osd", False),
        pytest.param(
            dict(optimizer="osd", rank=128, eight_bit=True, proj_optimizer="adam8bit"),
            "osd8",
            True,
            # H100, 2026-11-26 (bench/gpu.sh): estimated 1.41 GB, measured 0.81 GB. The 8-bit
            # step temporaries were fitted to the previous engine's eager quantiser; the
            # estimator's rework is issue [2/5]
            marks=pytest.mark.xfail(reason="8-bit temporaries fitted to the previous engine", strict=False),
        ),
    ],
)
def test_total_against_cuda_peak(kwargs, optimizer, per_layer):
    """The estimated peak against torch.cuda.max_memory_allocated over 3 bf16 steps of llama_60m."""
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = llama("llama_60m", "bfloat16").cuda()
    if optimizer == "adamw":
        opt = osd.AdamW(model.parameters())
    elif optimizer == "osd":
        opt = osd.AdamW(osd.param_groups(model, 128))
    else:
        opt = osd.Layerwise(osd.AdamW8bit(osd.param_groups(model, 128, proj_optimizer="adam8bit")), 1)
    ids = tokens(4, 256).cuda()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    peak = torch.cuda.max_memory_allocated() - base
    est = estimate("llama_60m", dtype="bfloat16", batch_size=4, seq_len=256, per_layer=per_layer, **kwargs)
    assert abs(est.total / peak - 1) < 0.1, (est.total, peak)


def test_published_full_rank_state():
    """Full-rank Adam state with bf16 moments, as the GaLore paper counts it (background.md §4:
    0.23 GB for 60m; 350m and 1b are within 0.16 GB of the paper's 1.37 and 5.20)."""
    assert round(estimate("llama_60m", dtype="bfloat16").optimizer_state / 1e9, 2) == 0.23


def test_checkpointing_keeps_layer_inputs_only():
    plain = estimate("llama_7b", batch_size=2, seq_len=512)
    ckpt = estimate("llama_7b", batch_size=2, seq_len=512, activation_checkpointing=True)
    assert dict(ckpt.details["activations"])["decoder layers (layer inputs only)"] == 32 * 4096 * 2 * 1024
    assert ckpt.activations < plain.activations / 5


def test_config_json_and_dict(tmp_path):
    from osd.models import resolve

    fields = resolve("llama_20m")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(fields))
    assert estimate(str(path)).weights == estimate("llama_20m").weights == estimate(fields).weights
    assert estimate("20m").weights == estimate("llama_20m").weights


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(config="llama_5t"), "unknown model 'llama_5t': give a LLaMA size (llama_9m"),
        (dict(optimizer="adam"), "unknown optimizer 'adam'; valid: adamw, adamw8bit, galore, osd"),
        (dict(optimizer="osd"), "optimizer osd needs a positive integer rank, got None"),
        (dict(optimizer="galore", rank=0), "optimizer galore needs a positive integer rank, got 0"),
        (dict(rank=8), "rank is only for galore/osd, not adamw"),
        (dict(dtype="int8"), "unknown dtype 'int8'; valid: float32"),
        (dict(optimizer="osd", rank=8, proj_optimizer="adam"), "unknown proj_optimizer 'adam'; valid: adamw"),
        (dict(optimizer="osd", rank=8, basis_dtype="float16"), "unknown basis_dtype 'float16'; valid: float32"),
        (dict(basis_dtype="bfloat16"), "basis_dtype is for galore/osd projection bases, not adamw"),
        (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
        (dict(seq_len=1.5), "seq_len must be a positive integer, got 1.5"),
        (dict(gradient_accumulation=0), "gradient_accumulation must be a positive integer, got 0"),
        (dict(loss_chunk=-1), "loss_chunk must be a non-negative integer (0: no chunks), got -1"),
        (dict(config={"hidden_size": 8}), "config: missing intermediate_size"),
        (
            dict(
                config={
                    **dict.fromkeys(("intermediate_size", "num_attention_heads"), 4),
                    "hidden_size": -1,
                    "num_hidden_layers": 2,
                    "vocab_size": 10,
                }
            ),
            "must be positive integers",
        ),
    ],
)
def test_bad_input(kwargs, message):
    kwargs = {"config": "llama_9m", **kwargs}
    with pytest.raises(ValueError, match=None) as info:
        estimate(**kwargs)
    assert message in str(info.value)


def test_unreadable_config(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read model config"):
        estimate(str(path))


def test_cli_prints_a_table(capsys):
    assert main(["--model", "llama_60m", "--optimizer", "osd", "--rank", "128", "--per_layer"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("llama_60m, osd rank 128, basis optimizer adamw, per-layer updates, bfloat16")
    assert "total (peak estimate)" in out and "basis optimizer (adamw)" in out


def test_per_layer_clipping_copies_each_projected_gradient():
    """osd.Layerwise's clipping keeps a clipped copy of a projected gradient through the rule
    (e per value of max(m, n) x r); nothing without per-layer updates."""
    from osd.memory import update_temporaries

    kw = dict(optimizer="osd", rank=1024, eight_bit=True, activation_checkpointing=True, batch_size=16)
    kw.update(proj_optimizer="sgd", basis_dtype="bfloat16", loss_chunk=1024)  # configs/llama_7b_sgd.toml
    for per_layer, extra in ((True, 11008 * 1024 * 2), (False, 0)):
        plain = estimate("llama_7b", per_layer=per_layer, **kw)
        clipped = estimate("llama_7b", per_layer=per_layer, grad_clipping=True, **kw)
        assert clipped.total - plain.total <= extra
        assert (clipped.total > plain.total) == per_layer
    one = update_temporaries((4096, 11008), 2, 1024, True)
    assert update_temporaries((4096, 11008), 2, 1024, True, clipped=True) == one + 11008 * 1024 * 2


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "llama_9m", "--optimizer", "sgd"], "osd-memory: error: unknown optimizer 'sgd'"),
        (["--model", "nope"], "osd-memory: error: unknown model 'nope'"),
        (["--optimizer", "adamw"], "osd-memory: error: the following arguments are required: --model"),
        (["--model", "llama_9m", "--batch_size", "x"], "osd-memory: error: argument --batch_size: invalid int"),
        (
            ["--model", "llama_9m", "--seq_len", "100000"],
            "osd-memory: error: seq_len 100000 exceeds the model's max_position_embeddings 1024",
        ),
        (["--model", "llama_9m", "--dtype", "float16"], "osd-memory: error: dtype float16 is not supported"),
        (
            ["--model", "llama_9m", "--optimizer", "galore", "--rank", "8", "--proj_optimizer", "sgd"],
            "osd-memory: error: proj_optimizer is the online-PCA basis optimizer of osd, not of galore",
        ),
    ],
)
def test_cli_errors_exit_2_with_one_line(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


def test_bench_estimates_and_stored_measurements(capsys, tmp_path):
    """bench/memory.py: the estimate table, and re-estimating a stored --measure run."""
    bench = _bench()
    assert bench.main(["--sizes", "llama_60m", "--methods", "adamw,osd8_pl"]) == 0
    out = capsys.readouterr().out
    assert "| llama_60m | AdamW | full | 0.23 | 0.23 |" in out
    rows = bench.rows(bench.parse_args(["--sizes", "llama_60m", "--methods", "adamw"]))
    rows[0]["measured"] = dict(peak_bytes=rows[0]["estimate"]["total"] // 2, state_bytes=1, tokens_per_s=10.0)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(dict(device="GPU X", batch=[8, 256], rows=rows)))
    assert bench.main(["--measured", str(path)]) == 0
    out = capsys.readouterr().out
    assert "measured on GPU X (stored)" in out and "| 2.000 | 10 | 1.00x |" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_bench_measure_needs_cuda(capsys):
    with pytest.raises(SystemExit) as info:
        _bench().parse_args(["--measure"])
    assert info.value.code == 2
    assert "--measure needs a CUDA device" in capsys.readouterr().err


def test_cli_warns_when_the_rank_is_clamped(capsys):
    assert main(["--model", "llama_9m", "--optimizer", "osd", "--rank", "4096"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("osd-memory: warning: rank 4096 > the smaller side of") and err.count("\n") == 1
    with pytest.warns(UserWarning, match="clamped"):
        estimate("llama_9m", optimizer="galore", rank=4096)


@pytest.mark.parametrize("name", ["llama_7b", "llama_7b_sgd", "llama_7b_lean"])
def test_shipped_7b_configs_state_their_estimate(name, capsys):
    """Each 7B config's header gives the peak osd-memory --config estimates for it (and the
    seed recipe's also the one without accumulation)."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml"
    header = path.read_text()
    runs = [[]] + ([["--total_batch_size", "16"]] if name == "llama_7b" else [])
    for extra in runs:
        assert main(["--config", str(path), *extra]) == 0
        total = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("total"))
        gb = float(total.split()[3])
        assert f"{gb:.2f} GB" in header, (extra, gb)


def test_config_cli_errors(tmp_path, capsys):
    bad = tmp_path / "lion.toml"
    bad.write_text('model_config = "llama_60m"\noptimizer = "galore_lion"\nrank = 128\nbatch_size = 4\n')
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "osd-memory: error: --optimizer galore_lion: the estimator counts Adam(W) state only"
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_bench_configs_builds_what_the_trainer_builds(tmp_path):
    """bench/configs.py on the CPU, two shipped configs shrunk to llama_9m (one accumulating):
    the optimizer state it builds is the estimate's to the byte; no peak without CUDA."""
    from pathlib import Path

    bench = _bench("configs")
    root = Path(__file__).resolve().parents[1] / "configs"
    shrink = ["--model_config", "llama_9m", "--rank", "32", "--dtype", "float32", "--batch_size", "2"]
    shrink += ["--total_batch_size", "4", "--max_length", "32", "--loss_chunk", "16"]
    configs = f"{root / 'llama_7b.toml'},{root / 'llama_7b_lean.toml'}"
    argv = ["--configs", configs, "--device", "cpu", "--steps", "2", "--out", str(tmp_path), "--", *shrink]
    assert bench.main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["proj_optimizer"] for r in rows] == ["adam8bit", "sgd"]
    for r in rows:
        assert r["measured"]["state_bytes"] == r["estimate"]["optimizer_state"], r
        assert "peak_bytes" not in r["measured"] and r["measured"]["tokens_per_s"] > 0


# osd-train configs (flags over a shipped config) whose whole step the estimate must match
META_CASES = {
    "seed recipe, one micro-batch": ("llama_7b", ["--total_batch_size", "16"]),
    "seed recipe, 2 micro-batches": ("llama_7b", ["--total_batch_size", "32"]),
    "paper (SGD on P)": ("llama_7b_sgd", []),
    "GaLore, no clipping": ("llama_7b_sgd", ["--proj_type", "std", "--grad_clipping", "0"]),
    "lean (rank 512, Fira)": ("llama_7b_lean", []),
    "loss not chunked": ("llama_7b_sgd", ["--loss_chunk", "0"]),
    "no checkpointing": (
        "llama_7b_sgd",
        ["--no-activation_checkpointing", "--batch_size", "4", "--total_batch_size", "4"],
    ),
    "fp32 state, fp32 bases": ("llama_7b_sgd", ["--optimizer", "galore_adamw_per_layer", "--basis_dtype", "float32"]),
    "stacked, not per-layer": (
        "llama_7b_sgd",
        ["--optimizer", "galore_adamw8bit", "--batch_size", "4", "--total_batch_size", "4"],
    ),
}


@pytest.mark.parametrize("case", META_CASES)
def test_total_against_a_whole_step_on_meta(case, tmp_path):
    """The estimated peak against what 3 steps of osd-train's loop allocate (tracked on the
    meta device, with FlashAttention's kernel: bench/configs.py --device meta) for a model of
    LLaMA-7B's width with 2 decoder layers, where the per-layer terms are what matter: equal
    to 0.1% (and 1 MiB of scalars and masks) (the fp32 plain update's figure is from an H100, 2%
    above what the meta device sees). The first step, which computes the initial bases (one
    SVD at a time, also for a stack), is not modelled: it peaks at most 0.4% above the later
    ones (the lean config, whose Fira update reuses the gradient's buffer: 9 MB)."""
    from pathlib import Path

    from osd.memory import trainer_estimate
    from osd.models import resolve

    bench = _bench("configs")
    model = tmp_path / "llama_7b_2_layers.json"
    model.write_text(json.dumps({**resolve("llama_7b"), "num_hidden_layers": 2}))
    config, extra = META_CASES[case]
    path = Path(__file__).resolve().parents[1] / "configs" / f"{config}.toml"
    args = bench.trainer_namespace(str(path), ["--model_config", str(model), *extra])
    est = trainer_estimate(args).total
    measured = bench.run(args, "meta", 3)
    steady, peak = measured["steady_peak_bytes"], measured["peak_bytes"]
    high = 1.03 if case == "fp32 state, fp32 bases" else 1.001
    assert steady - 2**20 <= est <= high * steady, (est, steady)  # 1 MiB: scalars and masks
    assert steady <= peak <= 1.004 * steady, (peak, steady)
