"""Smashed-data codecs: exact where promised, within the stated int8 bound, and strict about bad input."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from edgellm.errors import ConfigError
from edgellm.net.codec import (
    CODECS,
    COMPRESSIONS,
    CodecSpec,
    bytes_per_token,
    decode_tensor,
    encode_tensor,
    parse_codec,
)

ALL_SPECS = [CodecSpec(c, z) for c in CODECS for z in COMPRESSIONS]


def _hidden(seed: int = 0, shape: tuple[int, ...] = (2, 5, 64)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def _heavy_tailed(seed: int = 1) -> torch.Tensor:
    """LLM-like activations: mostly small, a few channels with huge outliers, one all-zero row."""
    x = _hidden(seed, (3, 4, 96)) * 0.1
    x[..., 7] = 300.0
    x[0, 1, 50] = -2000.0
    x[1, 2] = 0.0
    x[2, 3, :] = torch.logspace(-20, 4, 96)  # two dozen decades in one row, within float16 range
    return x


def _reference_int8(x: torch.Tensor) -> torch.Tensor:
    """Textbook symmetric per-row absmax int8 round trip, in float64."""
    x64 = x.double()
    scale = x64.abs().amax(dim=-1, keepdim=True) / 127.0
    q = torch.where(scale > 0, x64 / torch.where(scale > 0, scale, 1.0), 0.0).round().clamp(-127, 127)
    return (q * scale).float()


def test_none_is_exact_and_float32():
    x = _hidden()
    y = decode_tensor(encode_tensor(x, CodecSpec()))
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(y, x)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: f"{s.codec}+{s.compression}")
@pytest.mark.parametrize(
    "x",
    [
        torch.tensor([[1, 50_000, 2**40, -3]], dtype=torch.int64),
        torch.tensor([[True, False, True]]),
        torch.arange(-5, 5, dtype=torch.int32).reshape(2, 5),
        torch.arange(0, 256, dtype=torch.int16).to(torch.uint8),
    ],
    ids=["int64", "bool", "int32", "uint8"],
)
def test_non_float_is_lossless_whatever_the_codec(spec, x):
    enc = encode_tensor(x, spec)
    y = decode_tensor(enc)
    assert enc.dtype == str(x.dtype).removeprefix("torch.") and enc.scales == b""
    assert y.dtype == x.dtype and torch.equal(y, x)


@pytest.mark.parametrize("codec,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_codecs_equal_a_cast(codec, dtype):
    x = _heavy_tailed()
    y = decode_tensor(encode_tensor(x, CodecSpec(codec)))
    assert not torch.equal(y, x)  # lossy, so the equality below is not vacuous
    assert y.dtype == torch.float32
    assert torch.equal(y, x.to(dtype).float())


def test_half_codecs_accept_half_input():
    x = _hidden().to(torch.bfloat16)
    enc = encode_tensor(x, CodecSpec("bf16"))
    assert enc.dtype == "bfloat16"
    assert torch.equal(decode_tensor(enc), x.float())


def test_fp16_saturates_instead_of_overflowing():
    x = torch.tensor([[1e5, -1e6, 3.0]])
    y = decode_tensor(encode_tensor(x, CodecSpec("fp16")))
    assert torch.isfinite(y).all()
    assert y.tolist() == [[65504.0, -65504.0, 3.0]]


@pytest.mark.parametrize("x", [_hidden(), _heavy_tailed()], ids=["gaussian", "heavy_tailed"])
def test_int8_within_bound_and_matches_reference(x):
    enc = encode_tensor(x, CodecSpec("int8"))
    y = decode_tensor(enc)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert not torch.equal(y, x)
    absmax = x.abs().amax(dim=-1, keepdim=True)
    bound = absmax / 254 * (1 + 1e-5) + 1e-30
    assert ((x - y).abs() <= bound).all()
    ref = _reference_int8(x)
    # Same quantization grid; the float32-rounded scale may move a value by one float32 ulp of the row scale.
    assert torch.allclose(y, ref, rtol=1e-6, atol=0)
    assert torch.equal(y[x.abs().amax(-1) == 0], torch.zeros_like(y[x.abs().amax(-1) == 0]))
    assert len(enc.scales) == 4 * x.numel() // x.shape[-1]


def test_int8_extremes_stay_finite():
    big = torch.finfo(torch.float32).max
    x = torch.tensor([[big, -big, 1.0], [1e-45, 0.0, -1e-45], [0.0, 0.0, 0.0]])
    y = decode_tensor(encode_tensor(x, CodecSpec("int8")))
    assert torch.isfinite(y).all()
    assert y[0, 0] == pytest.approx(big, rel=1e-6) and y[2].eq(0).all()


def test_int8_refuses_non_finite_input():
    with pytest.raises(ConfigError, match="finite"):
        encode_tensor(torch.tensor([[1.0, float("inf")]]), CodecSpec("int8"))


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("compression", ["zstd", "lz4"])
def test_compression_is_bit_identical(codec, compression):
    x = _heavy_tailed()
    plain = encode_tensor(x, CodecSpec(codec))
    packed = encode_tensor(x, CodecSpec(codec, compression))
    assert packed.payload != plain.payload and packed.scales == plain.scales
    assert torch.equal(decode_tensor(packed), decode_tensor(plain))


def test_compression_shrinks_redundant_data():
    x = torch.zeros(1, 16, 576)
    for compression in ("zstd", "lz4"):
        assert encode_tensor(x, CodecSpec("none", compression)).nbytes < encode_tensor(x, CodecSpec()).nbytes / 10


@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (0, 4), (1, 1, 576)])
@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: f"{s.codec}+{s.compression}")
def test_odd_shapes_round_trip(shape, spec):
    x = torch.ones(shape) * 0.5
    y = decode_tensor(encode_tensor(x, spec))
    assert y.shape == x.shape and torch.equal(y, x)  # 0.5 is exact in every codec


def test_nbytes_and_bytes_per_token():
    x = _hidden(shape=(1, 1, 576))
    expected = {"none": 2304, "fp16": 1152, "bf16": 1152, "int8": 580}
    for codec, per_token in expected.items():
        spec = CodecSpec(codec)
        assert bytes_per_token(576, spec) == per_token
        assert encode_tensor(x, spec).nbytes == per_token
    assert bytes_per_token(576, CodecSpec("int8")) <= 640


def test_parse_codec():
    assert parse_codec("int8") == CodecSpec("int8", "none")
    assert parse_codec("int8+zstd") == CodecSpec("int8", "zstd")
    assert parse_codec(" FP16+lz4 ") == CodecSpec("fp16", "lz4")
    assert parse_codec("none") == CodecSpec()
    for bad in ("int4", "int8+gzip", "int8+zstd+lz4", "", "+zstd", "zstd"):
        with pytest.raises(ConfigError):
            parse_codec(bad)


def test_unknown_names_list_the_choices():
    with pytest.raises(ConfigError, match=r"unknown codec 'int4'.*'int8'"):
        CodecSpec("int4")
    with pytest.raises(ConfigError, match=r"unknown compression 'gzip'.*'zstd'"):
        CodecSpec("none", "gzip")
    enc = encode_tensor(_hidden(), CodecSpec("fp16"))
    for field, value in (
        ("codec", "int4"),
        ("compression", "gzip"),
        ("dtype", "complex64"),
        ("shape", (2, -1)),
    ):
        with pytest.raises(ConfigError, match=field if field != "shape" else "non-negative"):
            dataclasses.replace(enc, **{field: value})
    with pytest.raises(ConfigError, match="complex64"):
        encode_tensor(torch.zeros(2, dtype=torch.complex64), CodecSpec())


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: f"{s.codec}+{s.compression}")
def test_corrupt_payload_is_a_config_error(spec):
    enc = encode_tensor(_hidden(), spec)
    for payload in (enc.payload[:-1], enc.payload + b"\0", b"", b"garbage!" * 10):
        with pytest.raises(ConfigError):
            decode_tensor(dataclasses.replace(enc, payload=payload))
    with pytest.raises(ConfigError):  # the shape no longer matches the payload
        decode_tensor(dataclasses.replace(enc, shape=(2, 5, 63)))


def test_corrupt_scales_are_a_config_error():
    enc = encode_tensor(_hidden(), CodecSpec("int8"))
    with pytest.raises(ConfigError, match="scales"):
        decode_tensor(dataclasses.replace(enc, scales=enc.scales[:-4]))
    bad = torch.tensor([float("nan")] + [1.0] * 9).numpy().astype("<f4").tobytes()
    with pytest.raises(ConfigError, match="finite"):
        decode_tensor(dataclasses.replace(enc, scales=bad))
    with pytest.raises(ConfigError, match="no scales"):
        decode_tensor(dataclasses.replace(encode_tensor(_hidden(), CodecSpec("fp16")), scales=b"\0" * 40))


def test_oversized_zstd_frame_is_refused_before_inflating():
    import zstandard

    enc = encode_tensor(torch.zeros(4), CodecSpec("none", "zstd"))
    bomb = zstandard.compress(bytes(10_000_000), 3)
    with pytest.raises(ConfigError, match="claims"):
        decode_tensor(dataclasses.replace(enc, payload=bomb))
    headerless = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(16))
    with pytest.raises(ConfigError, match="claims -1"):
        decode_tensor(dataclasses.replace(enc, payload=headerless))


def test_oversized_lz4_frame_is_refused():
    import lz4.frame

    enc = encode_tensor(torch.zeros(4), CodecSpec("none", "lz4"))
    with pytest.raises(ConfigError, match="past 16 bytes"):
        decode_tensor(dataclasses.replace(enc, payload=lz4.frame.compress(bytes(1_000_000))))


# --- int8mu: mu-law companded int8 -------------------------------------------------------------------------------


def _outlier_rows(seed: int = 0) -> torch.Tensor:
    """Hidden-state-like rows: mostly N(0, 1), with a few outlier dimensions 50-100x larger."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 576, generator=g)
    x[:, [17, 247, 507]] *= torch.empty(8, 3).uniform_(50, 100, generator=g)
    return x


def test_int8mu_error_is_relative_and_bounded():
    from edgellm.net.codec import MU

    x = _outlier_rows()
    got = decode_tensor(encode_tensor(x, CodecSpec("int8mu")))
    a = x.abs().amax(-1, keepdim=True)
    bound = math.log1p(MU) * (x.abs() + a / MU) / 254 * 1.03 + 1e-6
    assert bool(((got - x).abs() <= bound).all())


def test_int8mu_beats_int8_on_outlier_heavy_rows_at_the_same_size():
    x = _outlier_rows(1)
    plain, mu = CodecSpec("int8"), CodecSpec("int8mu")
    assert bytes_per_token(576, mu) == bytes_per_token(576, plain) == 580
    typical = torch.ones(576, dtype=torch.bool)
    typical[[17, 247, 507]] = False
    err_plain = (decode_tensor(encode_tensor(x, plain)) - x)[:, typical].abs().mean()
    err_mu = (decode_tensor(encode_tensor(x, mu)) - x)[:, typical].abs().mean()
    assert err_mu < err_plain / 4, (err_mu, err_plain)


def test_int8mu_zero_rows_and_refusals():
    zeros = torch.zeros(2, 3, 16)
    assert torch.equal(decode_tensor(encode_tensor(zeros, CodecSpec("int8mu"))), zeros)
    with pytest.raises(ConfigError):
        encode_tensor(torch.tensor([[1.0, float("inf")]]), CodecSpec("int8mu"))
    enc = encode_tensor(torch.randn(2, 8), CodecSpec("int8mu"))
    with pytest.raises(ConfigError):
        decode_tensor(dataclasses.replace(enc, scales=enc.scales[:-1]))
