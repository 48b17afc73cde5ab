"""Gradient codecs without MPI: bytes, round trips, error bounds, unbiasedness, validation, aggregation."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from mpifed.compress import (
    ErrorFeedback, GatherCodec, OneShot, PayloadError, ReduceCodec, RoundContext, codec_names, codec_options,
    make_codec, option_types,
)
from mpifed.compress.aggregate import aggregate, reduce_in_process
from mpifed.compress.packing import BLOCK_VALUES, pack_uint, pack_width, packed_nbytes, unpack_uint
from mpifed.compress.halfprec import from_bits, to_bits

CTX = RoundContext(seed=3, round=5, client=2)
LAYERS = [("conv", (8, 3, 3, 3)), ("conv.bias", (8,)), ("fc", (10, 32)), ("fc.bias", (10,))]
N_LAYERS = sum(math.prod(s) for _, s in LAYERS)
ONE_SHOT = [name for name in codec_names() if name != "powersgd"]


def build(name: str, **options) -> object:
    return make_codec(name, layers=LAYERS, **options)


def vector(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def wire_bytes(codec, x: np.ndarray, ctx: RoundContext = CTX) -> int:
    """Bytes one client really sends: the encoded payload, or every payload of every phase."""
    if isinstance(codec, ReduceCodec):
        sent = []
        codec.exchange(x, ctx, lambda p: (sent.append(p.nbytes), p)[1])
        return sum(sent)
    return codec.encode(x, ctx).nbytes


# ---- bytes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ONE_SHOT)
@pytest.mark.parametrize("n", [1, 7, 8, 513, 1000, 4099])
def test_payload_nbytes_matches_the_real_payload(name, n):
    codec = build(name)
    assert codec.payload_nbytes(n) == wire_bytes(codec, vector(n)), name


@pytest.mark.parametrize("rank", [1, 2, 4, 9])
def test_powersgd_payload_nbytes_matches_both_phases(rank):
    codec = build("powersgd", rank=rank)
    assert codec.payload_nbytes(N_LAYERS) == wire_bytes(codec, vector(N_LAYERS))
    with pytest.raises(ValueError, match="totalling"):
        codec.payload_nbytes(N_LAYERS + 1)


def test_topk_at_one_percent_sends_at_least_45x_fewer_bytes_than_dense():
    n = 1_000_000
    assert make_codec("none").payload_nbytes(n) / make_codec("topk", density=0.01).payload_nbytes(n) >= 45


def test_transport_kinds():
    summable = {name for name in codec_names() if build(name).summable}
    assert summable == {"none", "fp16", "bf16", "randomk", "powersgd"}
    for name in codec_names():
        codec = build(name)
        assert isinstance(codec, ReduceCodec if codec.summable else GatherCodec)
        assert codec.name == name


# ---- round trips and error bounds ----------------------------------------------------------

@pytest.mark.parametrize("name", codec_names())
def test_encoding_leaves_the_update_unchanged(name):
    codec = build(name)
    x = vector(N_LAYERS)
    before = x.copy()
    if isinstance(codec, OneShot):
        codec.encode(x, CTX)
    codec_x = codec.exchange(x, CTX, lambda p: p, keep_own=True) if codec.summable else None
    assert np.array_equal(x, before)
    if codec_x is not None:
        assert codec_x.own.shape == x.shape and codec_x.total.shape == x.shape


def test_none_round_trip_is_exact_and_accepts_torch():
    x = vector(1001)
    codec = make_codec("none")
    assert np.array_equal(codec.decode(codec.encode(torch.from_numpy(x), CTX), x.size, CTX), x)


def bf16_reference(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bf16 -> float32 by bit arithmetic (finite x only)."""
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def test_half_precision_rounds_to_nearest_even():
    finite = np.concatenate([vector(5000) * 1e3, [0.0, -0.0, 1e-8, 1e-40, 3.0e38, 1 + 2**-8, 1 + 3 * 2**-8]])
    x = np.concatenate([finite, [np.inf, -np.inf]]).astype(np.float32)
    with np.errstate(over="ignore"):
        assert np.array_equal(from_bits(to_bits(x, "fp16"), "fp16"), x.astype(np.float16).astype(np.float32))
    bf16 = from_bits(to_bits(x, "bf16"), "bf16")
    assert np.array_equal(bf16[:-2], bf16_reference(x[:-2])) and np.array_equal(bf16[-2:], x[-2:])
    assert np.isnan(from_bits(to_bits(np.array([np.nan], np.float32), "bf16"), "bf16")).all()


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_half_combine_is_the_float32_sum_rounded_once_and_works_in_place(fmt):
    # every bit pattern against every other kind: subnormals, infinities, NaNs, opposite signs
    a = np.arange(2**16, dtype=np.uint16)
    b = np.random.default_rng(0).permutation(a)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = from_bits(a, fmt) + from_bits(b, fmt)
    wanted = to_bits(expected, fmt)
    codec = make_codec(fmt)
    a_before, b_before = a.copy(), b.copy()
    summed = codec.combine(a, b)
    assert np.array_equal(a, a_before) and np.array_equal(b, b_before)  # combine leaves its operands
    nan = np.isnan(expected)
    assert np.isnan(from_bits(summed, fmt)[nan]).all()
    assert np.array_equal(summed[~nan], wanted[~nan])
    codec.combine_into(np.frombuffer(a.tobytes(), np.uint16), b)  # a read-only operand is fine
    assert np.array_equal(b[~nan], wanted[~nan])
    with pytest.raises(ValueError, match="writable"):
        codec.combine_into(a, np.frombuffer(b.tobytes(), np.uint16))


@pytest.mark.parametrize("density", [0.01, 0.1, 0.5, 1.0])
def test_topk_keeps_the_largest_values_and_contracts(density):
    x = vector(3000)
    codec = make_codec("topk", density=density)
    y = codec.decode(codec.encode(x, CTX), x.size, CTX)
    kept = y != 0
    k = codec.count(x.size)
    assert kept.sum() == k and np.array_equal(y[kept], x[kept])
    if k < x.size:
        assert np.abs(x[~kept]).max() <= np.abs(x[kept]).min()
    # the contraction bound that error feedback relies on: ||x - C(x)||^2 <= (1 - k/n) ||x||^2
    assert np.sum((x - y) ** 2) <= (1 - k / x.size) * np.sum(x**2) + 1e-4


@pytest.mark.parametrize("levels", [1, 3, 7, 127])
def test_qsgd_error_is_within_one_level_of_the_bucket_norm(levels):
    x = vector(2000) * np.linspace(0.01, 10, 2000, dtype=np.float32)
    codec = make_codec("qsgd", levels=levels, bucket=128)
    y = codec.decode(codec.encode(x, CTX), x.size, CTX)
    grid = np.zeros(16 * 128, np.float32)
    grid[:2000] = x
    norms = np.repeat(np.linalg.norm(grid.reshape(16, 128), axis=1), 128)[:2000]
    assert (np.abs(y - x) <= norms / levels * (1 + 1e-5)).all()
    assert (np.sign(y)[y != 0] == np.sign(x)[y != 0]).all()


def test_sign_sends_scaled_signs_per_bucket():
    x = vector(300)
    codec = make_codec("sign", bucket=100)
    y = codec.decode(codec.encode(x, CTX), x.size, CTX)
    for b in range(3):
        part = slice(100 * b, 100 * (b + 1))
        expected = np.where(x[part] >= 0, 1, -1) * np.abs(x[part]).mean()
        assert np.allclose(y[part], expected, rtol=1e-6)
    assert make_codec("efsign").error_feedback and not make_codec("sign").error_feedback


# Several blocks of the blocked loops, buckets that do not divide the block or n, a lone last value.
BIG = 2 * BLOCK_VALUES + 1001


@pytest.mark.parametrize("bucket", [3, 100, 512])
def test_sign_bits_and_scales_over_several_blocks(bucket):
    x = vector(BIG, seed=2)
    x[::7] = -0.0  # counts as >= 0, like +0.0
    codec = make_codec("sign", bucket=bucket)
    payload = codec.encode(x, CTX)
    rows = math.ceil(BIG / bucket)
    assert np.array_equal(payload[4 * rows:], np.packbits(x >= 0, bitorder="little"))
    grid = np.zeros(rows * bucket)
    grid[:BIG] = x
    counts = np.minimum(bucket, BIG - bucket * np.arange(rows))
    scales = np.abs(grid).reshape(rows, bucket).sum(axis=1) / counts
    assert np.allclose(payload[:4 * rows].view(np.float32), scales, rtol=1e-6, atol=0)
    y = codec.decode(payload, BIG, CTX)
    assert np.allclose(y, np.where(x >= 0, 1, -1) * np.repeat(scales, bucket)[:BIG], rtol=1e-6, atol=0)


@pytest.mark.parametrize("levels, bucket", [(1, 100), (7, 512), (7, 3), (100, 1000)])
def test_qsgd_codes_are_the_two_nearest_levels_over_several_blocks(levels, bucket):
    x = vector(BIG, seed=3) * np.linspace(0.01, 10, BIG, dtype=np.float32)
    x[::11] = 0.0
    codec = make_codec("qsgd", levels=levels, bucket=bucket)
    payload = codec.encode(x, CTX)
    codec.validate(payload, BIG, CTX)
    rows = math.ceil(BIG / bucket)
    grid = np.zeros(rows * bucket)
    grid[:BIG] = x
    norms = np.repeat(np.linalg.norm(grid.reshape(rows, bucket), axis=1), bucket)[:BIG]
    assert np.allclose(np.repeat(payload[:4 * rows].view(np.float32), bucket)[:BIG], norms, rtol=1e-5)
    level = codec.decode(payload, BIG, CTX) / norms * levels  # no bucket here is all zeros
    exact = x / norms * levels
    assert np.allclose(level, np.round(level), atol=1e-3)
    assert (np.floor(exact) - 1e-4 <= level).all() and (level <= np.ceil(exact) + 1e-4).all()
    assert (level[x == 0] == 0).all()
    if BIG % (8 // codec.width):  # the unused codes of the last byte are zeros
        assert payload[-1] >> (BIG % (8 // codec.width) * codec.width) == 0


class _ExtremeNoise(RoundContext):
    """A client whose QSGD noise is all ones (u = 1 - 2^-21) or all zeros (u = 0)."""

    def __init__(self, bits: int):
        super().__init__(0, 0, 1)
        object.__setattr__(self, "bits", bits)

    def rng(self, purpose):
        bits = self.bits

        class Fixed:
            def integers(self, low, high, size, dtype, endpoint):
                return np.full(size, bits, dtype=dtype)

        return Fixed()


def test_qsgd_clamps_a_sum_rounded_up_past_the_top_level():
    # One value per bucket: |x| / ||x|| = 1, so x s / ||x|| = +-s, and s + (s + u) with u = 1 - 2^-21
    # rounds up to 2s + 1 in float32: the code must stay 2s, the decode must stay exact.
    x = np.array([1.0, -2.0, 0.5, -0.25, 3.0], np.float32)
    codec = make_codec("qsgd", levels=7, bucket=1)
    for bits in (2**64 - 1, 0):
        payload = codec.encode(x, _ExtremeNoise(bits))
        codec.validate(payload, x.size, CTX)
        assert np.array_equal(codec.decode(payload, x.size, CTX), x)


def test_qsgd_validation_reads_the_last_byte_but_not_its_padding():
    codec, n = make_codec("qsgd", levels=7, bucket=512), 101  # 4-bit codes: byte 50 holds code 100 + padding
    payload = codec.encode(vector(n), CTX)
    padded = payload.copy()
    padded[-1] |= 0xF0
    codec.validate(padded, n, CTX)
    bad = payload.copy()
    bad[-1] |= 0x0F
    with pytest.raises(PayloadError, match="code 15"):
        codec.validate(bad, n, CTX)


def test_bit_packing_round_trip():
    rng = np.random.default_rng(1)
    for width in (1, 2, 4, 8):
        for count in (1, 5, 8, 33, 70_001):
            codes = rng.integers(0, 2**width, count).astype(np.uint8)
            packed = pack_uint(codes, width)
            assert packed.nbytes == packed_nbytes(count, width)
            assert np.array_equal(unpack_uint(packed, width, count), codes)
    assert [pack_width(m) for m in (1, 2, 14, 15, 16, 254)] == [1, 2, 4, 4, 8, 8]


# ---- unbiasedness (statistical, fixed seed) -------------------------------------------------

def mean_z_scores(codec, x: np.ndarray, trials: int) -> np.ndarray:
    """z-score of the mean decoded value against x, over `trials` rounds of fresh randomness."""
    draws = np.stack([codec.decode(codec.encode(x, RoundContext(7, r, 1)), x.size, RoundContext(7, r, 1))
                      for r in range(trials)])
    err = draws.mean(axis=0) - x
    se = draws.std(axis=0, ddof=1) / math.sqrt(trials)
    return err / np.maximum(se, 1e-12)


@pytest.mark.parametrize("name, options", [("qsgd", {"levels": 2, "bucket": 16}),
                                           ("randomk", {"density": 0.25})])
def test_unbiased_in_expectation(name, options):
    x = vector(40, seed=4)
    z = mean_z_scores(make_codec(name, **options), x, trials=3000)
    # 40 z-scores of an unbiased estimator: |z| > 4.5 has probability ~3e-4 in total.
    assert np.abs(z).max() < 4.5, np.abs(z).max()


def test_the_unbiasedness_test_detects_a_biased_codec():
    x = vector(40, seed=4)
    z = mean_z_scores(make_codec("randomk", density=0.25, unbiased=False), x, trials=3000)
    assert np.abs(z).max() > 10


def test_randomness_is_keyed_by_seed_round_and_client():
    x = vector(500)
    qsgd = make_codec("qsgd")
    assert np.array_equal(qsgd.encode(x, CTX), qsgd.encode(x, RoundContext(3, 5, 2)))
    assert not np.array_equal(qsgd.encode(x, CTX), qsgd.encode(x, RoundContext(3, 5, 3)))
    assert not np.array_equal(qsgd.encode(x, CTX), qsgd.encode(x, RoundContext(3, 6, 2)))
    randomk = make_codec("randomk", density=0.1)
    shared = [randomk.indices(500, RoundContext(3, 5, c)) for c in (None, 0, 1)]
    assert all(np.array_equal(shared[0], s) for s in shared)
    assert not np.array_equal(shared[0], randomk.indices(500, RoundContext(3, 6, 0)))
    with pytest.raises(ValueError, match="server-side"):
        RoundContext(3, 5).rng("qsgd")


# ---- error feedback -------------------------------------------------------------------------

def test_error_feedback_carries_exactly_what_was_dropped():
    codec, n = make_codec("topk", density=0.05), 400
    feedback = ErrorFeedback(n)
    sent_total, input_total = np.zeros(n, np.float64), np.zeros(n, np.float64)
    for r in range(6):
        u = vector(n, seed=r)
        ctx = RoundContext(0, r, 1)
        xc = feedback.compensate(u)
        sent = codec.decode(codec.encode(xc, ctx), n, ctx)
        feedback.update(xc, sent)
        assert np.array_equal(feedback.residual, xc - sent)
        assert np.array_equal(feedback.residual[sent != 0], np.zeros((sent != 0).sum(), np.float32))
        sent_total += sent
        input_total += u
    # nothing is lost, only delayed: everything sent plus what is held equals everything given
    assert np.allclose(sent_total + feedback.residual, input_total, atol=1e-4)


def test_error_feedback_rejects_a_wrong_length():
    with pytest.raises(ValueError, match="holds 10"):
        ErrorFeedback(10).compensate(np.zeros(11, np.float32))


# ---- summable codecs: decode of the sum is the sum of decodes --------------------------------

@pytest.mark.parametrize("name, tol", [("none", 1e-6), ("randomk", 1e-6), ("fp16", 2e-3), ("bf16", 2e-2)])
def test_decode_of_summed_payloads_is_the_sum_of_decodes(name, tol):
    codec, n = make_codec(name, density=0.1) if name == "randomk" else make_codec(name), 1000
    xs = [vector(n, seed=s) for s in range(4)]
    total, results = reduce_in_process(codec, xs, clients=[0, 1, 2, 3], seed=1, round=2, keep_own=True)
    decodes = sum(r.own for r in results)
    assert np.allclose(total, decodes, rtol=tol, atol=tol * np.abs(decodes).max())
    if name == "none":
        assert np.allclose(total, sum(xs), atol=1e-5)


def test_powersgd_sum_is_the_sum_of_each_clients_share():
    codec = build("powersgd", rank=2)
    xs = [vector(N_LAYERS, seed=s) for s in range(3)]
    total, results = reduce_in_process(codec, xs, clients=[0, 1, 2], seed=1, round=0, keep_own=True)
    assert np.allclose(total, sum(r.own for r in results), atol=1e-4)
    assert all(np.allclose(r.total, total, atol=1e-6) for r in results)  # Allreduce: every rank has it


def test_powersgd_reproduces_a_matrix_of_rank_at_most_r():
    rng = np.random.default_rng(5)
    layers = [("w", (40, 30)), ("b", (40,))]
    for r in (1, 3):
        m = (rng.standard_normal((40, r)) @ rng.standard_normal((r, 30))).astype(np.float32)
        bias = vector(40)
        x = np.concatenate([m.reshape(-1), bias])
        # two clients whose sum has rank r
        total, _ = reduce_in_process(make_codec("powersgd", layers=layers, rank=r), [x / 4, 3 * x / 4],
                                     clients=[0, 1], seed=0, round=0)
        assert np.allclose(total[:1200].reshape(40, 30), m, atol=1e-4 * np.abs(m).max())
        assert np.allclose(total[1200:], bias, atol=1e-6)


def test_powersgd_warm_start_converges_to_the_best_rank_r_approximation():
    layers = [("w", (60, 50))]
    x = vector(3000, seed=9)
    u, s, vt = np.linalg.svd(x.reshape(60, 50).astype(np.float64))
    best = np.sqrt(np.sum(s[2:] ** 2))
    codec = make_codec("powersgd", layers=layers, rank=2)
    errors = []
    for r in range(30):
        total, _ = reduce_in_process(codec, [x], clients=[0], seed=0, round=r)
        errors.append(np.linalg.norm(total - x))
    assert errors[-1] < errors[0]
    assert errors[-1] <= best * 1.01


def test_powersgd_refuses_a_reduce_without_sums_for_clients():
    codec = build("powersgd")
    with pytest.raises(ValueError, match="Allreduce"):
        codec.exchange(vector(N_LAYERS), CTX, lambda p: None)


# ---- validation ---------------------------------------------------------------------------------

def malformed(codec, payload: np.ndarray) -> dict[str, np.ndarray]:
    """Payload variants that must be rejected: too short, too long, NaN, inf where values live."""
    cases = {"short": payload[:-1], "long": np.concatenate([payload, payload[:1]])}
    for label, bad in (("nan", np.nan), ("inf", np.inf)):
        broken = payload.copy()
        if isinstance(codec, ReduceCodec):
            if broken.dtype == np.uint16:
                broken[0] = to_bits(np.array([bad], np.float32), codec.format)[0]
            else:
                broken[0] = bad
        else:  # gather codecs: a float32 field sits where the codec keeps its values / scales
            floats_at = codec.count(100) * 4 if codec.name == "topk" else 0
            broken[floats_at:floats_at + 4] = np.array([bad], np.float32).view(np.uint8)
        cases[label] = broken
    return cases


@pytest.mark.parametrize("name", ONE_SHOT)
def test_validation_rejects_wrong_length_and_non_finite(name):
    codec = build(name)
    payload = codec.encode(vector(100), CTX)
    codec.validate(payload, 100, CTX)
    for label, bad in malformed(codec, payload).items():
        with pytest.raises(PayloadError):
            codec.validate(bad, 100, CTX)
            pytest.fail(f"{name}: {label} payload accepted")


def test_validation_rejects_bad_indices_codes_and_dtypes():
    topk = make_codec("topk", density=0.1)
    payload = topk.encode(vector(100), CTX)
    idx = payload[:40].view(np.uint32)
    for value, reason in ((100, "out of range"), (int(idx[0]), "ascending")):
        bad = payload.copy()
        bad[4:8] = np.array([value], np.uint32).view(np.uint8)
        with pytest.raises(PayloadError, match=reason):
            topk.validate(bad, 100, CTX)
    qsgd = make_codec("qsgd", levels=1, bucket=512)  # 2-bit codes: 3 would be out of range 0..2
    bad = qsgd.encode(vector(100), CTX)
    bad[4] = 0xFF
    with pytest.raises(PayloadError, match="code 3"):
        qsgd.validate(bad, 100, CTX)
    with pytest.raises(PayloadError, match="uint8"):
        topk.validate(payload.view(np.float32), 100, CTX)
    with pytest.raises(PayloadError, match="float32"):
        make_codec("none").validate(vector(100).astype(np.float64), 100, CTX)


# ---- aggregation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["topk", "qsgd", "sign", "none"])
def test_aggregate_rejects_one_bad_client_and_sums_the_rest(name):
    codec, n = build(name), 200
    xs = [vector(n, seed=s) for s in range(4)]
    payloads = [codec.encode(x, RoundContext(1, 9, c)) for c, x in zip((10, 11, 12, 13), xs)]
    payloads[2] = payloads[2][:-1]
    total, accepted, rejections = aggregate(codec, payloads, [10, 11, 12, 13], n, seed=1, round=9)
    assert accepted == [10, 11, 13]
    assert [(r.client, r.round) for r in rejections] == [(12, 9)]
    assert "client 12" in str(rejections[0]) and "round 10:" in str(rejections[0])  # said from 1
    expected = sum(codec.decode(p, n, RoundContext(1, 9, c)) for c, p in zip((10, 11, 13),
                                                                             [payloads[i] for i in (0, 1, 3)]))
    assert np.allclose(total, expected, atol=1e-6)


def test_aggregate_reads_payloads_sliced_from_one_gatherv_buffer():
    """Gatherv hands the server views at byte offsets, unaligned for float32 after an odd-length payload."""
    codec, n = make_codec("topk", density=0.1), 301
    payloads = [np.arange(3, dtype=np.uint8)] + [codec.encode(vector(n, seed=s), RoundContext(0, 0, s))
                                                 for s in (1, 2)]
    recv = np.concatenate(payloads)
    displs = np.concatenate([[0], np.cumsum([p.size for p in payloads])[:-1]])
    views = [recv[d:d + p.size] for d, p in zip(displs, payloads)]
    total, accepted, rejections = aggregate(codec, views, [0, 1, 2], n, seed=0, round=0)
    assert accepted == [1, 2] and rejections[0].client == 0 and "bytes, expected" in rejections[0].reason
    assert np.array_equal(total, sum(codec.decode(p, n, CTX) for p in payloads[1:]))


def test_aggregate_rescales_by_the_accepted_weight():
    codec, n = make_codec("none"), 50
    weights = [0.5, 0.25, 0.25]
    xs = [w * np.ones(n, np.float32) for w in weights]  # each client's weighted update of ones
    payloads = [codec.encode(x, CTX) for x in xs]
    payloads[0] = payloads[0].copy()
    payloads[0][7] = np.nan
    total, accepted, rejections = aggregate(codec, payloads, [0, 1, 2], n, 0, 0, weights=weights)
    assert accepted == [1, 2] and "non-finite" in rejections[0].reason
    assert np.allclose(total, 1.0)
    none_left = aggregate(codec, payloads[:1], [0], n, 0, 0, weights=weights[:1])
    assert none_left.accepted == [] and not none_left.total.any()


@pytest.mark.parametrize("name", ["topk", "qsgd", "sign"])
def test_aggregate_sums_in_place_as_the_decodes_would(name):
    """decode_add (top-k's touches only its k indices) gives what decode-then-add gives."""
    codec, n, weights = build(name), 300, [0.5, 0.3, 0.2]
    payloads = [codec.encode(vector(n, seed=s), RoundContext(2, 4, s)) for s in range(3)]
    decoded = [codec.decode(p, n, RoundContext(2, 4, s)) for s, p in enumerate(payloads)]
    out, squares = np.full(n, 7.0, np.float32), np.full(n, 7.0, np.float32)
    result = aggregate(codec, payloads, [0, 1, 2], n, 2, 4, weights=weights, squares=squares, out=out)
    assert result.total is out and result.accepted == [0, 1, 2]
    assert np.allclose(out, sum(decoded), atol=1e-6)
    assert np.allclose(squares, sum(d ** 2 / np.float32(w) for d, w in zip(decoded, weights)), rtol=1e-6)


def test_aggregate_refuses_multi_phase_codecs():
    with pytest.raises(ValueError, match="multi-phase"):
        aggregate(build("powersgd"), [], [], N_LAYERS, 0, 0)


# ---- registry ------------------------------------------------------------------------------------

def test_make_codec_errors_name_the_fix():
    with pytest.raises(ValueError, match="choose one of: bf16, efsign, fp16"):
        make_codec("zip")
    with pytest.raises(ValueError, match="its options are: density, error_feedback"):
        make_codec("topk", rank=2)
    with pytest.raises(ValueError, match="layer shapes"):
        make_codec("powersgd")
    with pytest.raises(ValueError, match="unbiased=false"):
        make_codec("randomk", error_feedback=True)
    for name, options in (("topk", {"density": 0}), ("qsgd", {"levels": 200}), ("sign", {"bucket": 0}),
                          ("powersgd", {"rank": 0})):
        with pytest.raises(ValueError):
            build(name, **options)
    assert all(isinstance(build(n), (OneShot, ReduceCodec)) for n in codec_names())


WRONG_TYPES = [
    ("topk", {"error_feedback": "false"},
     'compress.options.error_feedback = "false": must be a boolean (true or false) for codec topk'),
    ("randomk", {"unbiased": "no"}, 'compress.options.unbiased = "no": must be a boolean (true or false)'),
    ("powersgd", {"warm_start": 0}, "compress.options.warm_start = 0: must be a boolean (true or false)"),
    ("topk", {"density": "x"}, 'compress.options.density = "x": must be a number for codec topk'),
    ("randomk", {"density": True}, "compress.options.density = true: must be a number for codec randomk"),
    ("topk", {"density": math.nan}, "compress.options.density = nan: must be a finite number"),
    ("qsgd", {"levels": True}, "compress.options.levels = true: must be an integer for codec qsgd"),
    ("sign", {"bucket": 512.0}, "compress.options.bucket = 512.0: must be an integer for codec sign"),
]


@pytest.mark.parametrize("name, options, message", WRONG_TYPES, ids=[f"{n}-{[*o][0]}" for n, o, _ in WRONG_TYPES])
def test_codec_options_must_have_their_declared_type(name, options, message):
    """TOML values reach make_codec as the user typed them: "false" must not mean error feedback on."""
    with pytest.raises(ValueError, match=re.escape(message)):
        build(name, **options)


def test_codec_options_of_the_right_type_are_accepted_and_range_checked():
    codec = make_codec("topk", density=1, error_feedback=False)  # an int is a fine float
    assert codec.density == 1.0 and isinstance(codec.density, float) and codec.error_feedback is False
    assert make_codec("topk", error_feedback=None).error_feedback  # None: the codec's own default
    assert make_codec("qsgd", levels=np.int64(3)).levels == 3
    with pytest.raises(ValueError, match=r"must be in \(0, 1\], got 2"):
        make_codec("topk", density=2)
    both = 'compress.options.density = "x": must be a number for codec topk; compress.options.error_feedback'
    with pytest.raises(ValueError, match=re.escape(both)):  # every bad option at once, to fix in one pass
        make_codec("topk", density="x", error_feedback="no")


@pytest.mark.parametrize("name", codec_names())
def test_every_codec_option_declares_a_checkable_type(name):
    assert list(option_types(name)) == codec_options(name)


def test_train_print_job_rejects_a_string_boolean_option_like_other_job_errors():
    from click.testing import CliRunner

    from mpifed.cli import main

    reference = CliRunner().invoke(main, ["train", "--print-job", "--set", "train.rounds=zero"])
    result = CliRunner().invoke(main, ["train", "--print-job", "--set", 'compress.codec="topk"',
                                       "--set", 'compress.options={error_feedback="false"}'])
    assert result.exit_code == reference.exit_code != 0, result.output
    assert ('compress.options.error_feedback = "false": must be a boolean (true or false) for codec topk'
            in result.output), result.output
    assert "Traceback" not in result.output


# ---- benchmark ------------------------------------------------------------------------------------

def test_bench_compress_runs_and_reports_checked_bytes():
    from click.testing import CliRunner

    from mpifed.bench.compress import compress, run_bench

    rows = run_bench(["cnn"], ["none", "topk", "powersgd"], batch=4, classes=10, steps=1, repeats=1)
    by_codec = {r.codec: r for r in rows}
    n = by_codec["none"].n
    assert by_codec["none"].nbytes == 4 * n and by_codec["none"].rel_error == 0
    assert by_codec["topk"].dense_ratio >= 45
    assert all(r.t_step > 0 and r.step_fraction >= 0 for r in rows)
    result = CliRunner().invoke(compress, ["--model", "cnn", "--codec", "sign", "--batch", "2", "--steps", "1",
                                           "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert "sign" in result.output and "30.1x" in result.output
    rows = run_bench(["cnn"], ["fp16", "topk", "powersgd"], batch=2, classes=10, steps=1, repeats=1,
                     device=torch.device("cpu"))
    assert [r.where for r in rows] == ["cpu"] * 3  # every codec with its update a tensor on the device
    assert rows[0].nbytes == 2 * rows[0].n and 0 < rows[0].rel_error < 1e-3
    assert [r.nbytes for r in rows[1:]] == [by_codec["topk"].nbytes, by_codec["powersgd"].nbytes]
    result = CliRunner().invoke(compress, ["--model", "cnn", "--codec", "bf16", "--batch", "2", "--steps", "1",
                                           "--repeats", "1", "--device", "cpu"])
    assert result.exit_code == 0 and "bf16" in result.output, result.output
    if not torch.cuda.is_available():
        result = CliRunner().invoke(compress, ["--model", "cnn", "--device", "cuda"])
        assert result.exit_code != 0 and "no CUDA device is visible here" in result.output


def test_compare_round_times_takes_medians_against_dense():
    from mpifed.bench.rounds import compare_round_times

    fake = {"none": iter([1.0, 3.0, 2.0]), "topk": iter([0.5, 0.4, 9.0])}
    codecs = {"none": make_codec("none"), "topk": make_codec("topk")}
    times = compare_round_times(lambda codec: next(fake[codec.name]), codecs, repeats=3)
    assert [(t.codec, t.seconds, t.vs_dense) for t in times] == [("none", 2.0, 1.0), ("topk", 0.5, 0.25)]
    with pytest.raises(ValueError, match="baseline"):
        compare_round_times(lambda codec: 1.0, {"topk": codecs["topk"]})


@pytest.mark.parametrize("density", [0.0005, 0.01, 0.3])
def test_topk_fast_selection_equals_a_full_sort_on_large_vectors(density):
    from mpifed.compress.topk import SAMPLE, top_indices

    n = 4 * SAMPLE + 12345
    mag = np.abs(vector(n, seed=2) ** 3)
    mag[:1000] = 0.0  # ties and structure that a strided sample must survive
    k = math.ceil(density * n)
    chosen = top_indices(mag, k)
    assert chosen.size == k and np.unique(chosen).size == k
    assert np.array_equal(np.sort(mag[chosen]), np.sort(mag)[n - k:])
    mag[7] = np.nan  # a non-finite update takes the full path, which keeps the NaN (the server rejects it)
    assert 7 in top_indices(mag, k)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device "
                                                                                          "(.ci/gpu-check runs it)"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("name", ["none", "fp16", "bf16", "topk", "randomk", "sign", "efsign", "qsgd"])
@pytest.mark.parametrize("n", [1003, 4 * 100_000 + 777])
def test_codecs_encode_on_the_device_what_the_host_path_decodes(name, n, device):
    """On a CPU tensor, encode_tensor / decode_tensor (the direct path on a data plane) are the host codec on
    the tensor's memory: the host's bits. The torch ops an accelerator runs (encode_torch / decode_torch,
    here on CPU tensors) make payloads the host validates and decodes to what they decode to themselves;
    bit for bit the host's payload for top-k (sampled threshold included, n > 4 * SAMPLE), random-k and the
    16-bit codecs, the sign bits for sign (its scales summed in another order), and for QSGD (a torch
    generator's draws) codes within one level of the value, with the host's norms."""
    codec = make_codec(name)
    x = (np.random.default_rng(n).standard_normal(n) * 3).astype(np.float32)
    ctx, server = RoundContext(0, 5, 1), RoundContext(0, 5)
    host = codec.encode(x, ctx)
    payload = codec.encode_tensor(torch.from_numpy(x), ctx)
    assert codec.on_device and np.array_equal(codec.payload_array(payload), host)
    assert np.array_equal(codec.decode_tensor(payload, n, server).numpy(), codec.decode(host, n, server))
    if name in ("none", "fp16", "bf16"):  # encode_tensor is their torch op on every device
        there = codec.encode_tensor(torch.from_numpy(x).to(device), ctx)
        assert np.array_equal(codec.payload_array(there), host)
        return
    torch_payload = codec.encode_torch(torch.from_numpy(x).to(device), ctx)
    assert torch_payload.device.type == device
    got = codec.payload_array(torch_payload)
    codec.validate(got, n, server)
    decoded = codec.decode_torch(torch_payload, n, server).cpu().numpy()
    assert np.array_equal(decoded, codec.decode(got, n, server))
    if name in ("topk", "randomk"):
        assert np.array_equal(got, host)
    elif name in ("sign", "efsign"):
        scales = math.ceil(n / codec.bucket) * 4
        assert np.array_equal(got[scales:], host[scales:])
        np.testing.assert_allclose(got[:scales].view(np.float32), host[:scales].view(np.float32), rtol=1e-5)
    else:
        norms = math.ceil(n / codec.bucket)
        np.testing.assert_allclose(got[: 4 * norms].view(np.float32), host[: 4 * norms].view(np.float32), rtol=1e-5)
        step = np.repeat(got[: 4 * norms].view(np.float32) / codec.levels, codec.bucket)[:n]
        assert (np.abs(decoded - x) <= step * 1.0001).all()
        assert not np.array_equal(got, host)  # its own draws


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_powersgd_runs_its_phases_on_the_device_as_on_the_host(device):
    """phases_tensor on CPU tensors is the host's phases (same bits); phases_torch, the torch ops an
    accelerator runs, agrees with them to float32 rounding over warm-started rounds, Q kept as tensors."""
    layers = [("conv", (16, 8, 3, 3)), ("bias", (16,)), ("fc", (10, 64))]
    n = sum(math.prod(shape) for _, shape in layers)
    x = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    host, on_cpu, in_torch = (make_codec("powersgd", layers=layers, rank=2) for _ in range(3))

    def run(codec, steps):
        payload = next(steps)
        while True:
            try:
                payload = steps.send(payload.clone())
            except StopIteration as done:
                return done.value

    for rnd in range(3):
        ctx = RoundContext(0, rnd, 1)
        want = host.exchange(x, ctx, lambda p: p.copy(), keep_own=True)
        total, own = run(on_cpu, on_cpu.phases_tensor(torch.from_numpy(x), ctx, keep_own=True))
        assert np.array_equal(total.numpy(), want.total) and np.array_equal(own.numpy(), want.own)
        total, own = run(in_torch, in_torch.phases_torch(torch.from_numpy(x).to(device), ctx, keep_own=True))
        np.testing.assert_allclose(total.cpu().numpy(), want.total, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(own.cpu().numpy(), want.own, rtol=1e-4, atol=1e-5)
    assert all(isinstance(q, torch.Tensor) and q.device.type == device for q in in_torch._q)


def test_error_feedback_kept_as_a_tensor_is_the_host_arrays_update():
    """ErrorFeedback.on / update_tensor (the direct path) keep the residual the host path keeps, in the
    array's own memory on the CPU, and drop a non-finite one."""
    u, sent = np.arange(6, dtype=np.float32), np.array([0, 1, 0, 3, 0, 5], dtype=np.float32)
    host, device = ErrorFeedback(6), ErrorFeedback(6)
    for _ in range(2):
        xc = host.compensate(u)
        host.update(xc, sent)
        xt = torch.from_numpy(u) + device.on(torch.device("cpu"))
        device.update_tensor(xt, torch.from_numpy(sent))
    assert np.array_equal(device.host(), host.residual) and np.array_equal(device.residual, host.residual)
    device.update_tensor(torch.full((6,), float("nan")), torch.zeros(6))
    assert not device.host().any()
