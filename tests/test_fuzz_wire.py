"""Property-based fuzz of everything that decodes what a peer sends: frames, smashed-data codecs, request checks and
peer-sent JSON. Whatever the input, a decoder returns a value or raises its documented error (`WireError` for frames
and request checks, `ConfigError` for codecs and JSON), never another exception, and never hangs; valid input
round-trips, exactly or within the codec's stated bound.

Runs are derandomized (a fixed seed per test, no example database), so CI sees the same examples every time.

Bugs the fuzz found (inputs that raised something else) are kept as regression cases in the `REGRESSIONS_*`
tables.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from edgellm.errors import ConfigError
from edgellm.model.sampling import next_tokens
from edgellm.model.stage import ModelDims, StageSpec
from edgellm.net.codec import CODECS, COMPRESSIONS, DTYPES, MU, CodecSpec, EncodedTensor, decode_tensor, encode_tensor
from edgellm.net.frame import MAX_RANK, MAX_STRING, Reader, codec_byte, put_str, put_varint
from edgellm.net.messages import (
    MAGIC,
    PROTOCOL_VERSION,
    SYNC_OPS,
    AdapterSync,
    CloseSession,
    ForwardReply,
    ForwardRequest,
    HopTrace,
    SyncReply,
    TrainBackward,
    TrainForward,
    TrainOpen,
    WireError,
    decode,
    encode,
)
from edgellm.serve.generate_request import GENERATE_FIELDS, GenerateRequest
from edgellm.split.generator import GenerationConfig
from edgellm.split.validate import MAX_BATCH, check_hidden, check_inputs
from edgellm.splitlearn.settings import ServerTrainConfig

# ~150 examples a property keeps the file at ~15 s on the 2-core machine.
FUZZ = settings(
    max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
MESSAGE_TYPES = (ForwardRequest, ForwardReply, CloseSession, TrainOpen, TrainForward, TrainBackward, AdapterSync,
                 SyncReply)  # fmt: skip
HANG_S = 5.0  # decoding these few-KiB inputs takes milliseconds: this long means a hang
LZ4 = COMPRESSIONS.index("lz4")

# --- generated values ---

texts = st.text(max_size=24)  # <= 96 UTF-8 bytes, within MAX_STRING
routes = st.lists(st.text(max_size=8), max_size=4).map(tuple)
f32s = st.floats(width=32, allow_nan=False, allow_infinity=False)
u64s = st.integers(0, 2**64 - 1)
# sizes a peer may claim: small ones, and the edges of the machine's integers (a varint carries up to 70 bits)
EDGES = [2**31, 2**32 + 1, 2**62, 2**63, 2**64, 2**70 - 1]
dims = st.integers(0, 6) | st.sampled_from(EDGES) | st.integers(0, 2**70 - 1)
codec_names = st.sampled_from([c if z == "none" else f"{c}+{z}" for c in CODECS for z in COMPRESSIONS])
specs = st.builds(CodecSpec, st.sampled_from(CODECS), st.sampled_from(COMPRESSIONS))


def tensors(dtype, min_dims: int = 0, max_dims: int = 3, elements=None):
    shapes = array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=0, max_side=5)
    return arrays(dtype, shapes, elements=elements).map(lambda a: torch.from_numpy(a.copy()))


def with_outlier_column(x: torch.Tensor, scale: float, outlier: float) -> torch.Tensor:
    """Hidden-state-like rows: `x * scale` and a last column of `outlier` (LLMs have a few huge channels)."""
    return torch.cat([x * scale, torch.full_like(x[..., :1], outlier)], dim=-1)


# float32 over its whole finite range (zeros, subnormals, huge values, negatives), and hidden-state-like rows
floats = tensors(np.float32, elements=f32s)
hidden = st.builds(
    with_outlier_column,
    tensors(np.float32, 1, 3, st.floats(-3, 3, width=32)),
    st.sampled_from([1e-3, 1.0, 50.0]),
    st.sampled_from([0.0, 1e4, -3e5]),
)
ids = tensors(np.int64, 2, 2)
masks = tensors(np.bool_, 2, 2)
traces = st.builds(HopTrace, texts, texts, f32s, f32s, f32s, u64s, u64s)
named_tensors = st.lists(st.text(min_size=1, max_size=16), unique=True, max_size=3).flatmap(
    lambda names: st.tuples(*(st.tuples(st.just(n), floats) for n in names))
)
messages = st.one_of(
    st.builds(ForwardRequest, texts, ids | hidden, ids, st.none() | masks, st.booleans(), st.booleans(), routes,
              codec_names, st.booleans()),
    st.builds(ForwardReply, floats, f32s, f32s, st.lists(traces, max_size=3).map(tuple), st.booleans()),
    st.builds(CloseSession, texts, routes),
    st.builds(TrainOpen, texts, texts, texts, u64s, u64s, st.text(max_size=200), u64s, routes),
    st.builds(TrainForward, texts, u64s, hidden, ids, st.none() | masks, routes, codec_names, st.booleans()),
    st.builds(TrainBackward, texts, u64s, floats, routes, codec_names),
    st.builds(AdapterSync, texts, st.sampled_from(SYNC_OPS), u64s, f32s, named_tensors, st.booleans(), routes),
    st.builds(SyncReply, named_tensors, st.text(max_size=200)),
)  # fmt: skip

# --- checks ---


def same(a, b) -> bool:
    """Field-by-field equality; tensors must agree in dtype, shape and every value."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if dataclasses.is_dataclass(a):
        fields = dataclasses.fields(a)
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name)) for f in fields)
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def within_codec_bound(x: torch.Tensor, y: torch.Tensor, codec: str) -> bool:
    """`y` is float32 `x` after `codec`, within the bound `edgellm.net.codec` states (x: float32, finite)."""
    if y.dtype != torch.float32 or y.shape != x.shape or not bool(torch.isfinite(y).all()):
        return False
    if codec == "none":
        return torch.equal(y, x)
    if codec in ("fp16", "bf16"):  # a saturating cast
        dtype = torch.float16 if codec == "fp16" else torch.bfloat16
        return torch.equal(y, x.clamp(torch.finfo(dtype).min, torch.finfo(dtype).max).to(dtype).float())
    if x.numel() == 0:
        return True
    x64, y64 = x.double(), y.double()
    a = x64.abs().amax(-1, keepdim=True) if x.dim() else x64.abs()  # the row's absmax
    # The float32 scale of a row with absmax under 127 * 2**-126 is subnormal, or 0: it keeps few bits, so grant the
    # absolute error of 127 subnormal steps (~1.8e-43). The codec's docstring states this exception.
    slack = 128 * 2.0**-149
    if codec == "int8":
        bound = a / 254
    else:
        bound = math.log1p(MU) * (x64.abs() + a / MU) / 254
    return bool(((y64 - x64).abs() <= bound * (1 + 1e-5) + slack).all())


def decode_or_wire_error(frame: bytes):
    """decode(frame), or None when it raises WireError; any other exception fails the test, and so does a hang."""
    start = time.monotonic()
    try:
        message = decode(frame)
    except WireError:
        message = None
    assert time.monotonic() - start < HANG_S, f"decoding {len(frame)} bytes took too long"
    assert message is None or isinstance(message, MESSAGE_TYPES)
    return message


# --- regressions: a peer's tensor header ---

REGRESSIONS_TENSORS = {
    "a dim of 2**63 or more next to a 0 dim (TypeError from torch reshape)": ("none", "float32", (2**64, 0)),
    "lz4 with a shape of over 2**63 bytes (OverflowError from lz4)": ("lz4", "float32", (2**62, 4)),
    "lz4 with a shape of 2**62 bytes (MemoryError: lz4 allocates it)": ("lz4", "int8", (2**62,)),
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS_TENSORS))
def test_regression_tensor_headers_raise_config_error(name):
    with pytest.raises(ConfigError):
        compression, dtype, shape = REGRESSIONS_TENSORS[name]
        decode_tensor(EncodedTensor("none", compression, dtype, shape, b""))


# --- frames ---


@FUZZ
@given(messages)
def test_every_message_round_trips_exactly_with_the_lossless_codec(message):
    assert same(decode(encode(message)), message)


@FUZZ
@given(messages, specs)
def test_every_message_round_trips_within_the_codec_bound(message, spec):
    back = decode(encode(message, spec))
    assert type(back) is type(message)
    for field in dataclasses.fields(message):
        a, b = getattr(message, field.name), getattr(back, field.name)
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            assert within_codec_bound(a, b, spec.codec), field.name
        else:  # ids, masks, named adapter tensors and every non-tensor field travel exactly
            assert same(a, b), field.name


MUTATIONS = ("flip", "overwrite", "truncate", "extend", "insert", "delete")
mutations = st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 2**16), st.binary(min_size=1, max_size=8))


@FUZZ
@given(messages, specs, st.lists(mutations, min_size=1, max_size=3))
def test_mutated_frames_decode_or_raise_wire_error(message, spec, changes):
    frame = bytearray(encode(message, spec))
    for kind, where, data in changes:
        at = where % (len(frame) + 1)
        if kind == "flip" and at < len(frame):
            frame[at] ^= 1 << (data[0] % 8)
        elif kind == "overwrite" and at < len(frame):
            frame[at] = data[0]
        elif kind == "truncate":
            del frame[at:]
        elif kind == "extend":
            frame += data
        elif kind == "insert":
            frame[at:at] = data
        else:
            del frame[at : at + len(data)]
    back = decode_or_wire_error(bytes(frame))
    if back is not None:  # whatever decode accepts, encode writes back as the same message
        assert same(decode(encode(back)), back)


HEAD = MAGIC + PROTOCOL_VERSION.to_bytes(2, "little")


@FUZZ
@given(st.binary(max_size=256) | st.builds(lambda kind, body: HEAD + bytes([kind]) + body, st.integers(0, 12),
                                           st.binary(max_size=256)))  # fmt: skip
def test_arbitrary_bytes_decode_or_raise_wire_error(frame):
    decode_or_wire_error(frame)


@st.composite
def raw_tensor_fields(draw):
    """A tensor field's bytes, each header part drawn freely: codec byte, dtype, rank, dims, payload, scales."""
    known = [codec_byte(CodecSpec(c, z)) for c in CODECS for z in COMPRESSIONS]
    codec = draw(st.integers(0, 255) | st.sampled_from(known))
    shape = draw(st.lists(dims, max_size=MAX_RANK + 1))
    out = bytearray([codec, draw(st.integers(0, len(DTYPES) + 1)), len(shape)])
    for dim in shape:
        put_varint(out, dim)
    payload, scales = draw(st.binary(max_size=64)), draw(st.just(b"") | st.binary(max_size=16))
    for part in (payload, scales):  # the true length, or any claim
        put_varint(out, len(part) if draw(st.booleans()) else draw(st.integers(0, 2**20)))
    return bytes(out + payload + scales)


REPLY_HEAD = encode(ForwardReply(torch.zeros(0), 0.0))[: 7 + 1 + 4 + 4 + 1]  # prefix, flags, two times, no trace
DECODED_DTYPES = tuple(getattr(torch, name) for name in DTYPES if name not in ("float16", "bfloat16", "float64"))


@FUZZ
@given(raw_tensor_fields())
def test_a_tensor_field_with_any_header_decodes_or_raises_wire_error(raw):
    reply = decode_or_wire_error(REPLY_HEAD + raw)
    if reply is not None:
        assert reply.output.dtype in DECODED_DTYPES
        assert not reply.output.is_floating_point() or bool(torch.isfinite(reply.output).all())


@FUZZ
@given(st.integers(0, 2**70 - 1) | st.sampled_from(EDGES), st.text(max_size=80), st.binary(max_size=12))
def test_varints_and_strings_round_trip_and_the_reader_refuses_the_rest(number, text, tail):
    out = bytearray()
    put_varint(out, number)
    put_str(out, text)
    reader = Reader(bytes(out), 0)
    assert reader.varint("n") == number
    if len(text.encode()) > MAX_STRING:
        with pytest.raises(WireError, match="exceeds"):
            reader.string("s")
        return
    assert reader.string("s") == text
    reader.finish()
    reader = Reader(bytes(out) + tail, 0)  # any bytes after the fields: read as more fields, or refused
    try:
        for read in (reader.varint, reader.string, reader.varint, reader.string):
            read("f")
        reader.finish()
    except WireError:
        pass


# --- codecs ---


@FUZZ
@given(floats | hidden, specs)
def test_codecs_round_trip_within_their_stated_bound(x, spec):
    assert within_codec_bound(x, decode_tensor(encode_tensor(x, spec)), spec.codec)


@FUZZ
@given(st.sampled_from([np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_]).flatmap(tensors), specs)
def test_non_float_tensors_are_exact_under_every_codec(x, spec):
    assert same(decode_tensor(encode_tensor(x, spec)), x)


@FUZZ
@given(floats | hidden | ids | masks, specs, st.data())
def test_corrupted_payloads_raise_config_error(x, spec, data):
    enc = encode_tensor(x, spec)
    payload = enc.payload
    if payload:  # cut short: always refused
        cut = data.draw(st.integers(0, len(payload) - 1))
        with pytest.raises(ConfigError):
            decode_tensor(dataclasses.replace(enc, payload=payload[:cut]))
    with pytest.raises(ConfigError):  # bytes after the payload: always refused
        decode_tensor(dataclasses.replace(enc, payload=payload + data.draw(st.binary(min_size=1, max_size=8))))
    if enc.scales or not enc.is_float or spec.codec not in ("int8", "int8mu"):  # scales that do not fit the shape
        with pytest.raises(ConfigError):
            decode_tensor(dataclasses.replace(enc, scales=enc.scales[:-1] if enc.scales else b"\0" * 4))
    if payload:  # a flipped bit: refused, or a tensor of the declared shape and dtype
        at, bit = data.draw(st.integers(0, len(payload) - 1)), data.draw(st.integers(0, 7))
        flipped = bytearray(payload)
        flipped[at] ^= 1 << bit
        try:
            y = decode_tensor(dataclasses.replace(enc, payload=bytes(flipped)))
        except ConfigError:
            return
        assert y.shape == x.shape and y.dtype == (torch.float32 if enc.is_float else x.dtype)


@FUZZ
@given(
    st.sampled_from(CODECS),
    st.sampled_from(COMPRESSIONS),
    st.sampled_from(DTYPES),
    st.lists(dims, max_size=MAX_RANK).map(tuple),
    st.binary(max_size=64),
    st.just(b"") | st.binary(max_size=16),
)
def test_a_tensor_of_any_fields_decodes_to_its_shape_or_raises_config_error(
    codec, compression, dtype, shape, payload, scales
):
    try:
        y = decode_tensor(EncodedTensor(codec, compression, dtype, shape, payload, scales))
    except ConfigError:
        return
    assert tuple(y.shape) == shape


# --- request checks on decoded tensors ---

DIMS = ModelDims(hidden_size=8, vocab_size=50, max_length=16)
any_tensors = st.one_of(floats, hidden, *(tensors(t, 0, 4) for t in (np.int64, np.int32, np.uint8, np.bool_)))


@st.composite
def stage_inputs(draw):
    """(embed, data, positions, mask) near what a stage runs: sizes around each limit, values around each range;
    sometimes one of the three tensors is replaced by any tensor at all."""
    embed = draw(st.booleans())
    batch, seq = draw(st.sampled_from([0, 1, 2, MAX_BATCH, MAX_BATCH + 1])), draw(st.integers(0, DIMS.max_length + 1))
    if embed:
        data = torch.randint(-1, DIMS.vocab_size + 1, (batch, seq))
    else:
        data = torch.randn(batch, seq, draw(st.sampled_from([DIMS.hidden_size, DIMS.hidden_size + 1])))
    positions = torch.randint(draw(st.sampled_from([-1, 0])), 20, (batch, seq))
    mask = draw(st.none() | st.just(torch.ones(batch, seq, dtype=torch.bool)))
    parts = [data, positions, mask]
    if draw(st.booleans()):
        parts[draw(st.integers(0, 2))] = draw(any_tensors)
    return (embed, *parts)


@FUZZ
@given(stage_inputs())
def test_request_checks_pass_only_what_a_stage_can_run(inputs):
    embed, data, positions, mask = inputs
    stage = SimpleNamespace(spec=StageSpec(0, 2, embed=embed), dims=DIMS)
    try:
        check_inputs(data, positions, mask, stage)
    except WireError:
        with pytest.raises(WireError):
            check_hidden(data, positions, mask, stage)
        return
    batch, seq = data.shape[:2]
    assert 1 <= batch <= MAX_BATCH and 1 <= seq <= DIMS.max_length
    if embed:
        assert data.dtype == torch.int64 and int(data.min()) >= 0 and int(data.max()) < DIMS.vocab_size
    else:
        assert data.is_floating_point() and tuple(data.shape) == (batch, seq, DIMS.hidden_size)
    assert positions.dtype == torch.int64 and tuple(positions.shape) == (batch, seq) and int(positions.min()) >= 0
    assert mask is None or (mask.dtype == torch.bool and tuple(mask.shape) == (batch, seq))


# --- peer-sent JSON: the Generate request, and the training settings of TrainOpen ---

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
generate_requests = st.dictionaries(
    st.sampled_from(sorted(GENERATE_FIELDS)) | st.text(max_size=6), json_values, max_size=6
) | st.fixed_dictionaries({"prompt": st.text(max_size=8)}, optional={  # mostly valid values, and their edges
    "greedy": st.booleans(), "max_new_tokens": st.integers(-1, 100),
    "temperature": st.floats(0, 10) | st.sampled_from([1e-45, 1e-300, 1e300, math.inf, math.nan]),
    "top_k": st.integers(-1, 20) | st.sampled_from([2**63, 2**70]),
    "top_p": st.floats(0, 1) | st.sampled_from([1e-300]),
    "seed": st.integers(-(2**63), 2**64 - 1) | st.sampled_from([-(2**63) - 1, 2**64, 2**70]),
    "repetition_penalty": st.floats(0, 10) | st.sampled_from([1e-300, 1e300, math.inf, math.nan, -1.0]),
    "no_repeat_ngram": st.integers(-1, 6) | st.sampled_from([2**63]),
})  # fmt: skip
REGRESSIONS_GENERATE = {  # accepted, then sampling fails with another error
    "seed-2**64": {"prompt": "x", "seed": 2**64},  # ValueError from torch's manual_seed
    "temperature-1e-40": {"prompt": "x", "greedy": False, "temperature": 1e-40},  # RuntimeError: NaN probabilities
    "lone-surrogate-prompt": {"prompt": "a\ud800b"},  # UnicodeEncodeError in the tokenizer: an internal error
    "lone-surrogate-message": {"messages": [{"role": "user", "content": "\udfff"}]},
}


@FUZZ
@given(generate_requests)
def test_a_generate_request_is_refused_or_can_be_sampled_from(request):
    try:
        parsed = GenerateRequest.from_json(request)
        config = GenerationConfig(parsed.max_new_tokens, parsed.sampling)
    except ConfigError:
        return
    assert (isinstance(parsed.prompt, str) or parsed.ids or parsed.messages) and config.max_new_tokens >= 1
    for text in [parsed.prompt or "", *(m.content for m in parsed.messages or ())]:
        text.encode("utf-8")  # a tokenizer can take it
    logits = torch.randn(2, 16, generator=torch.Generator().manual_seed(0)) * 5  # [B, V]
    history = [[1, 2, 1, 2, 15, 40], [5]]  # the repetition guard's: ids past the vocabulary are ignored
    chosen = next_tokens(logits, parsed.sampling, torch.Generator().manual_seed(parsed.sampling.seed), history)
    assert chosen.shape == (2,) and bool(((chosen >= 0) & (chosen < 16)).all())


@pytest.mark.parametrize("name", sorted(REGRESSIONS_GENERATE))
def test_regression_generate_requests_are_refused_with_config_error(name):
    with pytest.raises(ConfigError):
        parsed = GenerateRequest.from_json(REGRESSIONS_GENERATE[name])
        next_tokens(torch.randn(1, 16), parsed.sampling, torch.Generator().manual_seed(parsed.sampling.seed), [[1]])


scalars = st.none() | st.booleans() | st.integers(-3, 3) | st.floats() | st.text(max_size=3)
optim_docs = st.fixed_dictionaries({}, optional={  # mostly valid values, or any scalar
    "lr": st.floats(1e-6, 1) | scalars, "weight_decay": st.floats(0, 1) | scalars,
    "beta1": st.floats(0, 0.99) | scalars, "beta2": st.floats(0, 0.999) | scalars, "eps": st.floats(0, 1e-3) | scalars,
})  # fmt: skip
lora_docs = st.fixed_dictionaries({}, optional={
    "r": st.integers(-1, 2000) | scalars, "alpha": st.floats(0, 64) | scalars, "dropout": st.floats(0, 1) | scalars,
    "init_seed": st.integers() | scalars,
    "target_modules": st.lists(st.sampled_from(["q_proj", "v_proj", "all-linear", "", ".x"]), max_size=2) | scalars,
})  # fmt: skip
TRAINING_KEYS = ["lora", "optim", "seed", "round_timeout_s", "share"]
training_configs = st.text(max_size=40) | st.one_of(
    st.dictionaries(st.sampled_from(TRAINING_KEYS) | st.text(max_size=4), json_values, max_size=4),
    st.fixed_dictionaries({}, optional={
        "lora": lora_docs, "optim": optim_docs, "seed": st.integers() | scalars,
        "round_timeout_s": st.floats(0, 1e3) | scalars, "share": st.sampled_from(["shared", "per-client", "x"]),
    }),
).map(json.dumps)  # fmt: skip
REGRESSIONS_TRAINING = [  # OverflowError; then three that AdamW refuses (TypeError, ValueError) on the server
    '{"seed": Infinity}', '{"optim": {"eps": "x"}}', '{"optim": {"eps": -1}}', '{"optim": {"weight_decay": NaN}}',
]  # fmt: skip


@FUZZ
@given(training_configs)
def test_a_training_config_is_refused_or_round_trips_and_builds_its_optimizer(text):
    try:
        config = ServerTrainConfig.from_json(text)
    except ConfigError:
        return
    assert ServerTrainConfig.from_json(config.to_json()) == config
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)], **config.optim.adamw_kwargs())


@pytest.mark.parametrize("text", REGRESSIONS_TRAINING)
def test_regression_training_configs_are_refused_with_config_error(text):
    with pytest.raises(ConfigError):
        config = ServerTrainConfig.from_json(text)
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], **config.optim.adamw_kwargs())
