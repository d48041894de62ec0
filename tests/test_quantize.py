"""Weight-only int8 / int4 through torchao on the CPU: smaller weights, close predictions,
generation, and clear refusals."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao", reason="quantized inference needs torchao (the dev extra)")

from lmfab.cli import main  # noqa: E402
from lmfab.data.shards import open_shard  # noqa: E402
from lmfab.infer.generate import generate, load_trained  # noqa: E402
from lmfab.infer.quantize import QuantizeError, quantize_model, weight_bytes  # noqa: E402
from lmfab.models import build_model  # noqa: E402
from tests.test_generate import random_model  # noqa: E402


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_is_smaller_agrees_and_generates(scheme, tiny_run, tiny_data):
    model, tok, _ = load_trained(tiny_run)
    _, tokens = open_shard(next((tiny_data / "val").glob("*.tok")))
    x = torch.from_numpy(tokens.reshape(-1)[: 16 * 32].astype("int64")).view(16, 32)
    with torch.no_grad():
        ref = model(x)
    linear = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    before = weight_bytes(model)
    report = quantize_model(model, scheme)
    assert len(report.layers) == 2 * 4 and scheme in report.summary()
    # int8: a quarter of fp32 plus scales; int4: two weights per byte (every layer of this
    # model fits the packed CPU kernel), an eighth plus scales and zeros
    assert weight_bytes(model) < before - (0.7 if scheme == "int8" else 0.83) * linear
    if scheme == "int4":
        assert all("packed" in v for v in report.layers.values()), report.layers
    with torch.no_grad():
        out = model(x)
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.9, f"top-1 agreement {agree:.3f}"
    text = generate(model, tok, ["The king"], max_new_tokens=8, stop_token_ids=[])[0]
    assert len(tok.encode(text).ids) >= 4


def test_packed_cpu_int4_in_an_fp32_model_with_an_untied_head(monkeypatch):
    import copy

    from lmfab.infer import quantize
    from lmfab.infer.quantize import Bf16Linear

    model = random_model("tiny-neox")  # untied output head, partial rotary, parallel residual
    unpacked = copy.deepcopy(model)
    x = torch.tensor([[5, 17, 99, 3, 250, 7, 42, 11]])
    with torch.no_grad():
        ref = model(x)
    before = weight_bytes(model)
    report = quantize_model(model, "int4")
    assert report.layers["lm_head"] == "int4 groups of 64 (packed, bf16 compute)"
    assert isinstance(model.lm_head, Bf16Linear) and isinstance(model.blocks[0].mlp.fc, Bf16Linear)
    # the fallback a torchao without the packed CPU tensor takes: one int4 value per byte
    monkeypatch.setattr(quantize, "_cpu_int4_config", lambda: None)
    fallback = quantize_model(unpacked, "int4")
    assert all("stored unpacked: this torchao" in v for v in fallback.layers.values())
    assert weight_bytes(model) < weight_bytes(unpacked) < before
    with torch.no_grad():
        out, out_unpacked = model(x), unpacked(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape

    def rel(o):
        return ((o - ref).norm() / ref.norm()).item()

    # bf16 compute adds ~1% to int4's own error (random weights, 4 layers: ~0.2 either way)
    assert rel(out) < 1.1 * rel(out_unpacked) and rel(out) < 0.3, (rel(out), rel(out_unpacked))


def test_a_layer_no_group_divides_is_still_quantized():
    model = random_model("tiny-llama")  # d_ff 172: no int4 group of 32 fits the down-projection
    report = quantize_model(model, "int4")
    assert report.layers["blocks.0.mlp.proj"].startswith("int4 per-row")
    # gate and up: 2 x 172 = 344 outputs, not a multiple of 16 (the packed kernel's rule)
    assert report.layers["blocks.0.mlp.fc"] == ("int4 groups of 64 (stored unpacked: the "
                                                "packed kernel needs outputs in multiples of 16)")
    # q, k, v of 4 + 2 + 2 heads of 16: 128 outputs
    assert report.layers["blocks.0.attn.qkv"] == "int4 groups of 64 (packed, bf16 compute)"
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_unsupported_schemes_and_devices_say_what_is_supported(tiny_run, capsys):
    with pytest.raises(QuantizeError, match="expected one of int8, int4"):
        quantize_model(random_model("tiny-learned"), "int3")
    meta = build_model(random_model("tiny-learned").cfg)  # on the meta device
    with pytest.raises(QuantizeError, match="does not run on meta.*int8 and int4 run on cpu "
                                            "and cuda"):
        quantize_model(meta, "int8")
    assert main(["generate", "--model-dir", str(tiny_run), "--quantize", "int8", "--device",
                 "cpu", "--prompt", "The", "--max-new-tokens", "4"]) == 0
    assert "quantized: int8 on cpu" in capsys.readouterr().err


@pytest.mark.gpu
def test_int4_on_cuda_packs_two_weights_per_byte():
    from lmfab.config import ModelConfig
    from lmfab.infer.generate import Request, run_batch
    from lmfab.models import materialize
    from tests.test_generate import _NoTokenizer

    # widths that are multiples of 1024: the tinygemm layout pads inputs to those
    cfg = ModelConfig(n_layer=1, n_head=8, d_model=1024, d_ff=4096, vocab_size=512,
                      max_seq_len=64, pos="rope", mlp="swiglu", norm="rmsnorm", bias=False)
    model = materialize(build_model(cfg), "cuda", seed=0, dtype=torch.bfloat16).eval()
    linear = sum(m.weight.numel() * 2 for m in model.modules() if isinstance(m, torch.nn.Linear))
    before = weight_bytes(model)
    report = quantize_model(model, "int4")
    assert set(report.layers.values()) == {"int4 groups of 128"}
    assert weight_bytes(model) < before - 0.7 * linear  # 2 bytes -> ~0.53 per weight
    out = run_batch(model, _NoTokenizer(), [Request([1, 2, 3], max_new_tokens=8,
                                                    stop_token_ids=[])])
    assert len(out[0].token_ids) == 8
