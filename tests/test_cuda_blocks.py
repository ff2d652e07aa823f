"""The compiled decode step's fused CUDA kernels (runtime/cuda_blocks.py) against the generic graph.

`LayerBlocks` below is the kernels' interface over the generic graph: each call is the layer's
own method (runtime/model.py `DecoderLayer.predict`, `attention_residual`, `correct`,
`corrected`), the arithmetic every other backend runs. On any machine the compiled step run
through that interface equals the generic step (the step's plumbing around the kernels); on a
CUDA GPU each kernel equals its `LayerBlocks` call on random inputs, and the compiled step with
the kernels equals the generic step token by token. The GPU tests are skipped where MLX has no
CUDA device: `bash benchmarks/h100.sh e2b-narrow cuda-tests` runs this file on one (pytest staged
there by benchmarks/stage_test_wheels.sh).
"""

import os

import mlx.core as mx
import numpy as np
import pytest

from runtime import cuda_blocks
from runtime.fast import CompiledDecoder, DecodeStep, attention, heads
from tests.checkpoints import make_checkpoint, tiny_text_config
from tests.runtime_helpers import convert, load_quietly

CUDA = mx.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs MLX's CUDA backend on a CUDA GPU")


class LayerBlocks:
    """`cuda_blocks.Blocks`' calls, each the generic layer's own method."""

    def __init__(self, model):
        lm = model.model.language_model
        self.layers, self.plane_mask = lm.layers, lm.plane_mask

    def predict(self, i, planes):
        predictions, _, normed = self.layers[i].predict(planes)
        return predictions, normed

    def active(self, i, pred):
        a = self.layers[i].active
        return pred[..., a : a + 1, :]

    def tail_predict(self, i, prev_pred, activated, correction, projected):
        mask = self.plane_mask.astype(prev_pred.dtype)
        planes = self.layers[i - 1].corrected(prev_pred, self.active(i - 1, prev_pred), activated, correction,
                                              projected, mask)
        return self.predict(i, planes)

    def attn_laurel(self, i, attn, laurel, pred, normed):
        return self.layers[i].attention_residual(attn, laurel, self.active(i, pred), normed)

    def correct(self, i, mlp, attn_laurel, pred):
        return self.layers[i].correct(mlp, attn_laurel, self.active(i, pred))

    def activation(self, i):
        mlp = self.layers[i].mlp
        return None if mlp.std_multiplier is None else mlp.activate

    @staticmethod
    def heads(x, position, table, eps):
        return heads(x, position, table, eps)

    @staticmethod
    def attends(slots, head_dim):
        return cuda_blocks.attends(slots, head_dim)

    @staticmethod
    def attention(q, kv, mask):
        return attention(q, kv, mask)


CONFIGS = {
    "tiny": {},
    # wider than a thread block's 256 lanes and no multiple of it, another active plane, no scale;
    # the activation-sparse layers' gates wider than the sparse kernel's 512 lanes, no multiple of it
    "wide": dict(hidden_size=320, altup_active_idx=1, altup_correct_scale=False,
                 intermediate_size=[1200] * 5 + [96] * 5),
}


def bundle(root, name, dtype):
    """The `cuda` bundle of config `name` in `dtype` under `root`, converted the first time."""
    out = root / f"cuda-{name}-{dtype}"
    if not out.exists():
        src = make_checkpoint(root / f"src-{name}", "hf", seed=5, text_config=tiny_text_config(**CONFIGS[name]))
        convert(src, out, "cuda", "--dtype", dtype)
    return out


class Models(dict):
    """(config name, dtype) -> a model of a `cuda` bundle, converted the first time it is asked for."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, key):
        self[key] = load_quietly(bundle(self.root, *key))[0]
        return self[key]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return Models(tmp_path_factory.mktemp("blocks"))


def decoder(model, blocks, prompt=(5, 17, 33, 2, 9, 100, 200, 31, 7)):
    """A compiled decoder after an eager prefill of `prompt`, its step built with `blocks`."""
    cache = model.make_cache()
    mx.eval(model(mx.array([list(prompt)]), cache=cache))
    dec = CompiledDecoder(model, cache)
    step = DecodeStep(model, blocks=blocks)
    dec._step = mx.compile(lambda token, position, *arrays: step(token, position, *arrays))
    return dec


def greedy_logits(dec, tokens: int, fed: list[int] | None = None) -> tuple[list[int], list[np.ndarray]]:
    """The greedy ids and the logits of `tokens` steps; each step is fed the previous step's id,
    or where `fed` is given, its tokens in turn (the same inputs for two decoders to compare)."""
    ids, logits, token = [], [], 5
    for k in range(tokens):
        out = dec(mx.array([token if fed is None else fed[k]]))
        logits.append(np.array(out.astype(mx.float32)))
        token = int(mx.argmax(out, axis=-1).item())
        ids.append(token)
    return ids, logits


def rel(a, b) -> float:
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return float(np.abs(a - b).max() / max(np.sqrt((b**2).mean()), 1e-30))


def test_switch_refuses_what_it_does_not_know():
    assert cuda_blocks.enabled({cuda_blocks.ENV: "0"}) is False
    with pytest.raises(ValueError, match=f"{cuda_blocks.ENV}='yes'"):
        cuda_blocks.enabled({cuda_blocks.ENV: "yes"})
    for value in ("", "nan", "-1", "2", "1" * 100_000):  # a huge one is cut in the message
        with pytest.raises(ValueError, match=cuda_blocks.ENV) as e:
            cuda_blocks.enabled({cuda_blocks.ENV: value})
        assert len(str(e.value)) < 200
    # the default: on, where the default device is a CUDA GPU
    assert cuda_blocks.enabled({}) is (CUDA and mx.default_device().type == mx.gpu)


def test_the_sparse_kernel_takes_the_sparse_layers_it_can_hold():
    from runtime.model import TextConfig

    def config(sparsity, widths):
        return TextConfig.from_dict(tiny_text_config(activation_sparsity_pattern=sparsity, intermediate_size=widths))

    assert cuda_blocks.sparse_kernel_layers(config([0.95] * 5 + [0.0] * 5, [128] * 10)) == {0, 1, 2, 3, 4}
    wide = cuda_blocks.SPARSE_WIDTH
    widths = [wide, wide + 1, 64, 64, 64, wide + 1, 64, 64, 64, 64]
    assert cuda_blocks.sparse_kernel_layers(config([0.95] * 3 + [0.0] * 7, widths)) == {0, 2}


def test_the_attention_kernel_takes_the_buffers_it_can_hold():
    slots, width = cuda_blocks.ATTENTION_SLOTS, cuda_blocks.ATTENTION_WIDTH
    assert cuda_blocks.attends(1, 16) and cuda_blocks.attends(slots, width)
    assert not cuda_blocks.attends(slots + 1, width) and not cuda_blocks.attends(slots, width + 1)


def test_the_kernels_read_a_weight_as_rows_whichever_layout_stored_it():
    """The AltUp matrices the kernels read row by row, from a standard and a pretransposed
    bundle alike (runtime/projections.py reads the layout)."""
    from runtime.projections import projection_over, row_major_weight

    w = mx.arange(12, dtype=mx.float32).reshape(4, 3)  # [out, in]
    standard, pretransposed = projection_over("standard", w), projection_over("pretransposed", mx.contiguous(w.T))
    assert "weight_t" in pretransposed and "weight" not in pretransposed
    for module in (standard, pretransposed):
        got = row_major_weight(module)
        assert got.shape == (4, 3) and mx.array_equal(got, w).item()


def test_a_bad_switch_stops_the_command_and_the_api_at_load(models, tmp_path):
    import subprocess
    import sys

    import runtime
    from runtime.inputs import BadValue

    path = bundle(models.root, "tiny", "float32")
    env = {**os.environ, cuda_blocks.ENV: "fast"}
    done = subprocess.run([sys.executable, "-m", "runtime", "generate", str(path), "--prompt", "hi"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {cuda_blocks.ENV}='fast': use 1 (the default: fused "
                                                "kernels on a CUDA GPU) or 0 (the generic graph)"]
    os.environ[cuda_blocks.ENV] = "2"
    try:
        with pytest.raises(BadValue, match=f"{cuda_blocks.ENV}='2'"):
            runtime.load(path)
    finally:
        del os.environ[cuda_blocks.ENV]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_step_through_the_blocks_interface_is_the_generic_step(models, name):
    """What the step does around the kernels (which outputs go where, the last layer's end),
    checked on any machine: the step through `LayerBlocks` decodes as the generic step does."""
    model = models[name, "float32"]
    ids, logits = greedy_logits(decoder(model, LayerBlocks(model)), 12)
    ref_ids, ref_logits = greedy_logits(decoder(model, None), 12)
    assert ids == ref_ids
    for a, b in zip(logits, ref_logits, strict=True):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def random_inputs(model, seed, width=1):
    c = model.config
    h, n = c.hidden_size, c.altup_num_inputs
    rng = np.random.default_rng(seed)
    dtype = model.model.language_model.layers[0].input_layernorm.weight.dtype

    def arr(*shape, scale=1.0):
        return mx.array((rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)

    return dict(planes=arr(n, h, scale=3.0), activated=arr(1, h, scale=3.0), correction=arr(n, 1, scale=0.3),
                projected=arr(1, h, scale=2.0), attn=arr(1, h), laurel=arr(1, h, scale=0.1), normed=arr(1, h),
                mlp=arr(1, h, scale=5.0), attn_laurel=arr(1, h, scale=3.0), gate=arr(1, width, scale=2.0),
                up=arr(1, width, scale=2.0))


# Float32 matmuls run in TF32 on a GPU unless MLX_ENABLE_TF32=0 (h100.sh cuda-tests sets it):
# the generic graph's router and coefficient products are then the less exact side.
TF32 = mx.default_device().type == mx.gpu and os.environ.get("MLX_ENABLE_TF32", "1") != "0"
TOLERANCE = {"float32": 2e-3 if TF32 else 1e-5, "bfloat16": 2e-2}
STEP_TOLERANCE = 2e-2 if TF32 else 1e-4  # float32


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_kernel_equals_the_generic_graph(models, name, dtype):
    model = models[name, dtype]
    blocks, ref = cuda_blocks.Blocks(model.config, model.model.language_model.layers), LayerBlocks(model)
    tol = TOLERANCE[dtype]
    for i in (0, 3, model.config.num_hidden_layers - 1):
        x = random_inputs(model, seed=i)
        pred, normed = ref.predict(i, x["planes"])
        calls = {
            "predict": (i, x["planes"]),
            "attn_laurel": (i, x["attn"], x["laurel"], pred, normed),
            "correct": (i, x["mlp"], x["attn_laurel"], pred),
        }
        if i:
            calls["tail_predict"] = (i, pred, x["activated"], x["correction"], x["projected"])
        width = model.config.intermediate_size[i]
        if ref.activation(i) is not None:  # an activation-sparse layer: the gate's Gaussian top-k, gelu * up
            gate, up = (random_inputs(model, seed=i, width=width)[k] for k in ("gate", "up"))
            calls["sparse_activate"] = (i, gate, up)
        for method, args in calls.items():
            if method == "sparse_activate":
                got, want = [blocks.activation(i)(*args[1:])], [ref.activation(i)(*args[1:])]
            else:
                got, want = getattr(blocks, method)(*args), getattr(ref, method)(*args)
            for k, (g, w) in enumerate(zip(got, want, strict=True)):
                assert g.shape == w.shape and g.dtype == w.dtype, (method, k)
                assert rel(g, w) <= tol, (method, i, k, rel(g, w))


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_attention_kernel_equals_the_generic_attention(dtype):
    """One query token over K/V buffers of several lengths (1, under a warp's 32 slots, not a
    multiple of the block's 256, the longest it takes), written up to a random slot (the rest
    masked), q heads sharing K/V heads as Gemma3n's do, at a head width below, at and above 32
    lanes and not a multiple of them.

    In float32 the softmax's exponent turns a score's rounding into the same relative error in
    its weight, and the kernel and the generic matmul round different sums: scores of unit-RMS
    heads reach 4 * sqrt(256) = 64, where one float32 ulp is 7.6e-6. So the float32 bound adds
    two ulps of the largest score (the H200 measured 1.29e-5 at 300 slots, head width 256, over
    the flat 1e-5); a wrong kernel is off by O(1)."""
    rng = np.random.default_rng(7)
    for slots in (1, 7, 300, cuda_blocks.ATTENTION_SLOTS):
        for nq, nkv, d in ((2, 1, 32), (8, 2, 256), (4, 2, 48), (3, 3, 16)):
            written = int(rng.integers(0, slots))
            q = mx.array(rng.standard_normal((1, nq, 1, d)).astype(np.float32)).astype(getattr(mx, dtype))
            kv = mx.array(rng.standard_normal((1, 2 * nkv, slots, d)).astype(np.float32)).astype(getattr(mx, dtype))
            mask = mx.where(mx.arange(slots) <= written, 0.0, -mx.inf).astype(getattr(mx, dtype))
            got, want = cuda_blocks.attention(q, kv, mask), attention(q, kv, mask)
            assert got.shape == want.shape == (1, nq * d) and got.dtype == want.dtype
            tol = TOLERANCE[dtype]
            if dtype == "float32":  # every q head against every K and V row: a bound on the scores
                scores = np.array(q).reshape(nq, d).astype(np.float64) @ np.array(kv).reshape(-1, d).T
                tol += 2 * float(np.spacing(np.float32(np.abs(scores).max())))
            assert rel(got, want) <= tol, (slots, nq, nkv, d, written, rel(got, want), tol)


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_heads_kernel_equals_the_generic_graph(models, name, dtype):
    """A layer's q/k/v heads (q alone in a KV-shared layer) normed, scaled and rotated, with the
    model's own RoPE tables, at positions from 0 to far along (large angles)."""
    model = models[name, dtype]
    step, eps = DecodeStep(model, blocks=None), model.config.rms_norm_eps
    rng = np.random.default_rng(3)
    for i in (0, model.config.num_hidden_layers - 1):
        table = step.rope_tables[i]
        n, d = table[0].shape[1], table[0].shape[4] * 2
        for position in (0, 7, 5000):
            x = mx.array((rng.standard_normal((1, n, 1, d)) * 3).astype(np.float32)).astype(getattr(mx, dtype))
            pos = mx.array(position, mx.int32)
            got, want = cuda_blocks.heads(x, pos, table, eps), heads(x, pos, table, eps)
            assert got.shape == want.shape and got.dtype == want.dtype
            assert rel(got, want) <= TOLERANCE[dtype], (i, position, rel(got, want))


def float32_copy(model):
    """The model with its bfloat16 parameters in float32: the same weights, computed exactly."""
    from mlx.utils import tree_map

    model.update(tree_map(lambda x: x.astype(mx.float32) if x.dtype == mx.bfloat16 else x, model.parameters()))
    return model


def worst(logits, ref_logits) -> float:
    """The largest logit difference over the steps, relative to the reference step's largest logit."""
    return max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(logits, ref_logits, strict=True))


@needs_cuda
@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_step_with_the_kernels_decodes_as_the_generic_step(models, name):
    """Float32: the same greedy ids and logits within 1e-4 (without TF32) of the generic step's."""
    model = models[name, "float32"]
    blocks = cuda_blocks.Blocks(model.config, model.model.language_model.layers)
    ref_ids, ref_logits = greedy_logits(decoder(model, None), 16)
    ids, logits = greedy_logits(decoder(model, blocks), 16, fed=[5, *ref_ids])  # the generic step's inputs
    assert ids == ref_ids
    assert worst(logits, ref_logits) <= STEP_TOLERANCE, worst(logits, ref_logits)


@needs_cuda
@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_step_with_the_kernels_rounds_no_worse_than_the_generic_step(models, name):
    """Bfloat16: the tiny random models amplify rounding (the generic bf16 step's logits lie
    0.24-0.30 of the largest logit away from the same weights computed in float32; a kernel that
    rounds one value a unit differently moves them by as much), so the kernels' step is held to
    the exact computation instead: no further from it than twice the generic step is."""
    model = models[name, "bfloat16"]
    exact = float32_copy(load_quietly(bundle(models.root, name, "bfloat16"))[0])  # a second copy, cast
    ref_ids, ref_logits = greedy_logits(decoder(exact, None), 16)
    fed = [5, *ref_ids]
    _, generic = greedy_logits(decoder(model, None), 16, fed=fed)
    _, fused = greedy_logits(decoder(model, cuda_blocks.Blocks(model.config, model.model.language_model.layers)),
                             16, fed=fed)
    assert worst(fused, ref_logits) <= 2 * worst(generic, ref_logits), (worst(fused, ref_logits),
                                                                        worst(generic, ref_logits))


@needs_cuda
def test_the_kernels_take_the_place_of_most_of_a_layers_small_ones(models):
    """The default compiled step on a CUDA GPU uses the kernels, and they replace what they
    should: per layer 3 custom kernels where the generic graph has 19 kernels and a few views
    (layer 0 has no previous layer's end in its first kernel, the last layer ends generically),
    the heads' norm and RoPE as one where it has 2, attention as one where it has 3, and one
    more in each activation-sparse layer where the generic graph has 5."""
    import io

    model = models["tiny", "float32"]
    assert cuda_blocks.enabled()

    def kernels(blocks):
        dec = decoder(model, blocks)
        mx.eval(dec(mx.array([5])))
        token = mx.array([[5]], dtype=mx.int32)
        dot = io.StringIO()
        mx.export_to_dot(dot, *dec._step(token, mx.array(dec.position, mx.int32), *dec.buffers))
        return dot.getvalue()

    layers = model.config.num_hidden_layers
    default = DecodeStep(model)
    assert isinstance(default.blocks, cuda_blocks.Blocks)
    fused, generic = kernels(default.blocks), kernels(None)
    sparse = sum(s > 0 for s in model.config.activation_sparsity_pattern)
    assert sparse and fused.count('label ="CustomKernel') == 5 * layers + sparse
    nodes = lambda dot: dot.count("shape=rectangle")  # noqa: E731
    assert nodes(generic) - nodes(fused) >= 18 * layers, (nodes(generic), nodes(fused))
