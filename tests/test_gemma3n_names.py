"""The converter's description of Gemma3n matches the reference implementation's parameters."""

import pytest

from convert.gemma3n import expected_tensors, kv_shared_unused, projection_role
from tests.checkpoints import tiny_text_config

transformers = pytest.importorskip("transformers")


def test_expected_tensors_match_transformers():
    cfg = tiny_text_config()
    ref = transformers.Gemma3nForCausalLM(transformers.Gemma3nTextConfig(**cfg))
    names = {k[len("model."):]: tuple(v.shape) for k, v in ref.state_dict().items() if k.startswith("model.")}
    assert expected_tensors(cfg) == names


def test_kv_shared_layers_have_no_kv():
    cfg = tiny_text_config()
    unused = kv_shared_unused(cfg)
    assert len(unused) == 3 * cfg["num_kv_shared_layers"]
    assert not set(unused) & set(expected_tensors(cfg))


@pytest.mark.parametrize(
    "module, role",
    [
        ("layers.3.mlp.gate_proj", "mlp.gate_proj"),
        ("layers.12.self_attn.k_proj", "attn.k_proj"),
        ("layers.0.altup.prediction_coefs", "altup.prediction_coefs"),
        ("altup_projections.2", "altup_projections"),
        ("per_layer_model_projection", "per_layer_model_projection"),
        ("layers.0.input_layernorm", None),
        ("embed_tokens", None),
        ("layers.0.altup.router_norm", None),
    ],
)
def test_projection_role(module, role):
    assert projection_role(module) == role
