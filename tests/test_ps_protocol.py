"""The wire format (framing, validation), the socket layer and the shard plan."""

from __future__ import annotations

import math
import re
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ps_server import PARAMS, RawWorker, _pull, _push_frames, grads_for, serving

from distnet.ps import protocol, sharding, transport
from distnet.ps.protocol import (
    PROTOCOL_VERSION,
    Entry,
    ProtocolError,
    decode,
    dense_entries,
    encode,
)


def _push(arrays, **fields):
    header = {"op": "push", "wid": 1, "seq": 7, "ver": 3, **fields}
    return encode(header, dense_entries(arrays))


def _raw(header, *frames):
    return [msgpack.packb(header, use_bin_type=True), *frames]


def _good_header(**over):
    h = {"op": "push", "v": PROTOCOL_VERSION, "wid": 0, "seq": 1, "ver": 0, "keys": ["w"],
         "dtypes": ["float32"], "shapes": [[2, 2]], "codec": "none", "meta": [{}]}
    h.update(over)
    return h


# ---- round trips ------------------------------------------------------------------------
def test_roundtrip_dtypes_shapes_and_zero_copy():
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4),
              "b": np.array(2.5, np.float64), "c": np.zeros((0, 5), np.float16),
              "d": np.arange(6, dtype=np.int64)}
    frames = _push(arrays)
    assert all(isinstance(f, np.ndarray) for f in frames[1:])  # arrays go out as themselves
    msg = decode([bytes(memoryview(f)) for f in frames])
    assert msg.op == "push" and msg.header["ver"] == 3 and msg.header["v"] == PROTOCOL_VERSION
    got = msg.arrays()
    for k, a in arrays.items():
        assert got[k].dtype == a.dtype and got[k].shape == a.shape
        np.testing.assert_array_equal(got[k], a)
    buf = bytearray(memoryview(frames[1]))
    view = decode([frames[0], buf, *frames[2:]]).arrays()["a"]
    buf[0:4] = np.float32(99).tobytes()
    assert view[0, 0] == 99  # np.frombuffer over the frame: no copy


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(0, 5), max_size=3), min_size=0, max_size=4),
       dtype=st.sampled_from(["float16", "float32", "float64", "int8", "int32"]))
def test_roundtrip_property(shapes, dtype):
    rng = np.random.default_rng(0)
    arrays = {f"k{i}": (rng.standard_normal(s) * 10).astype(dtype) for i, s in enumerate(shapes)}
    got = decode([bytes(memoryview(f)) for f in _push(arrays)]).arrays()
    assert list(got) == list(arrays)
    for k in arrays:
        np.testing.assert_array_equal(got[k], arrays[k])


def test_reply_needs_status():
    frames = encode({"op": "pull", "wid": 0, "seq": 1, "ver": 0, "status": "ok",
                     "message": ""}, [])
    assert decode(frames, reply=True).header["status"] == "ok"
    with pytest.raises(ProtocolError, match="status"):
        decode(encode({"op": "pull", "wid": 0, "seq": 1, "ver": 0}, []), reply=True)
    err = encode({"op": "error", "wid": 0, "seq": 0, "ver": 0, "status": "error",
                  "message": "bad"}, [])
    assert decode(err, reply=True).header["message"] == "bad"
    with pytest.raises(ProtocolError, match="unknown op"):
        decode(err)  # "error" is a reply, never a request


def test_big_endian_input_is_sent_little_endian():
    a = np.arange(4, dtype=">f4")
    got = decode(_push({"a": a})).arrays()["a"]
    np.testing.assert_array_equal(got, a)


# ---- validation -------------------------------------------------------------------------
BAD = [
    ("not msgpack", [b"\xc1garbage"], "not valid msgpack"),
    ("trailing bytes", [msgpack.packb({"op": "pull"}) + b"x"], "not valid msgpack"),
    ("header a list", _raw([1, 2]), "must be a map"),
    ("int map key", _raw({1: 2}), "not valid msgpack"),
    ("extension type", [msgpack.packb(msgpack.ExtType(1, b"x"))], "not valid msgpack"),
    ("unknown op", _raw(_good_header(op="explode"), b"\0" * 16), "unknown op"),
    ("wrong version", _raw(_good_header(v=99), b"\0" * 16), "version 99 not spoken"),
    ("missing wid", _raw({k: v for k, v in _good_header().items() if k != "wid"},
                         b"\0" * 16), "'wid'"),
    ("bool seq", _raw(_good_header(seq=True), b"\0" * 16), "'seq'"),
    ("negative ver", _raw(_good_header(ver=-1), b"\0" * 16), "'ver'"),
    ("key not str", _raw(_good_header(keys=[3]), b"\0" * 16), "keys must be"),
    ("repeated keys", _raw(_good_header(keys=["w", "w"], dtypes=["float32"] * 2,
                                        shapes=[[2, 2]] * 2, meta=[{}, {}]),
                           b"\0" * 16, b"\0" * 16), "repeat"),
    ("dtype object", _raw(_good_header(dtypes=["object"]), b"\0" * 16), "not allowed"),
    ("dtype big-endian", _raw(_good_header(dtypes=[">f4"]), b"\0" * 16), "not allowed"),
    ("dtypes short", _raw(_good_header(dtypes=[]), b"\0" * 16), "'dtypes' has 0"),
    ("negative dim", _raw(_good_header(shapes=[[-2, 2]]), b"\0" * 16), "shape"),
    ("float dim", _raw(_good_header(shapes=[[2.0, 2]]), b"\0" * 16), "shape"),
    ("too many dims", _raw(_good_header(shapes=[[1] * 9]), b"\0" * 4), "shape"),
    ("too many elements", _raw(_good_header(shapes=[[2**20, 2**20]]), b""), "elements"),
    ("unknown codec", _raw(_good_header(codec="zip"), b"\0" * 16), "unknown codec"),
    ("meta not map", _raw(_good_header(meta=[3]), b"\0" * 16), "meta must be a map"),
    ("frame missing", _raw(_good_header()), "0 array frames for 1 keys"),
    ("extra frame", _raw(_good_header(), b"\0" * 16, b"\0"), "2 array frames for 1 keys"),
    ("short frame", _raw(_good_header(), b"\0" * 15), "15 bytes, expected 16"),
    ("int8 without scale", _raw(_good_header(codec="int8"), b"\0" * 4), "scale"),
    ("pull since negative", _raw(_good_header(op="pull", since=-3), b"\0" * 16), "'since'"),
]


@pytest.mark.parametrize("frames, match", [(f, m) for _, f, m in BAD], ids=[b[0] for b in BAD])
def test_validation_names_the_problem(frames, match):
    with pytest.raises(ProtocolError, match=match):
        decode(frames)


def test_a_header_checked_before_is_still_checked_strictly():
    """Entry descriptions that passed once are reused (protocol._SpecCache), but 1.0 and
    True equal 1 in Python: a dimension of either is still refused after a good one."""
    good = _raw(_good_header(shapes=[[1, 4]]), b"\0" * 16)
    for _ in range(2):
        assert decode(good).entries[0].shape == (1, 4)
    for dim in (1.0, True):
        with pytest.raises(ProtocolError, match="shape"):
            decode(_raw(_good_header(shapes=[[dim, 4]]), b"\0" * 16))
    with pytest.raises(ProtocolError, match="15 bytes, expected 16"):  # sizes are compared
        decode(_raw(_good_header(shapes=[[1, 4]]), b"\0" * 15))


def test_limits_bound_the_header_before_unpacking():
    big = _raw(_good_header(message="x" * 5000), b"\0" * 16)
    with pytest.raises(ProtocolError, match="header of"):
        decode(big, limits=protocol.Limits(max_header_bytes=1000))
    many = _raw(_good_header(keys=[f"k{i}" for i in range(50)]), b"\0" * 16)
    with pytest.raises(ProtocolError, match="msgpack"):
        decode(many, limits=protocol.Limits(max_keys=10))
    with pytest.raises(ProtocolError, match="message of"):
        decode(_raw(_good_header(), b"\0" * 16), limits=protocol.Limits(max_message_bytes=8))


def test_peek_fields_is_best_effort():
    assert protocol.peek_fields(_raw({"op": "push", "wid": 2, "seq": 9, "junk": 1})) == {
        "op": "push", "wid": 2, "seq": 9}
    assert protocol.peek_fields(_raw({"op": "nope", "wid": -1, "seq": "x"})) == {}
    assert protocol.peek_fields([b"\xc1"]) == {}
    assert protocol.peek_fields([]) == {}


def test_no_pickle_in_the_package():
    for path in (Path(protocol.__file__).parent).glob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "allow_pickle=True" not in text, path


# ---- bad messages sent to a live server ---------------------------------------------------
def _header(**over):
    h = {"op": "push", "v": 1, "wid": 0, "seq": 50, "ver": 0, "keys": list(PARAMS),
         "dtypes": ["float32"] * 3, "shapes": [list(a.shape) for a in PARAMS.values()],
         "codec": "none", "meta": [{}] * 3}
    h.update(over)
    return msgpack.packb(h)


def _frames_of(arrays):
    return [np.ascontiguousarray(a) for a in arrays.values()]


def _with(key, value):
    g = dict(grads_for(0, 0))
    g[key] = value
    return g


G = grads_for(0, 0)
NAN = _with("w", np.where(np.eye(8, 4) > 0, np.nan, 1.0).astype(np.float32))
INF = _with("b", np.array([0, np.inf, 0, 0], np.float32))
MALFORMED = [
    ("garbage frames", [b"\x00\xff\x13", b"junk"], "not valid msgpack"),
    ("wrong frame count", [_header(), *_frames_of(G)[:2]], "2 array frames for 3 keys"),
    ("bad dtype", [_header(dtypes=["complex64"] * 3), *_frames_of(G)], "not allowed"),
    ("frame shorter than shape", [_header(), *_frames_of(G)[:2], b"\0" * 10],
     "10 bytes, expected 16"),
    ("shape mismatch", _push_frames(_with("w", G["w"].T.copy()), 51),
     r"'w' is \(4, 8\) float32, the parameter is \(8, 4\)"),
    ("dtype mismatch", _push_frames(_with("b", G["b"].astype(np.float64)), 52), "float64"),
    ("unknown op", [msgpack.packb({"op": "explode", "v": 1, "wid": 0, "seq": 53})],
     "unknown op"),
    ("unknown key", _push_frames({**G, "extra": np.ones(2, np.float32)}, 54),
     r"unknown \['extra'\]"),
    ("missing key", _push_frames({"w": G["w"]}, 55), r"missing \['b', 'emb'\]"),
    ("NaN gradient", _push_frames(NAN, 56), "'w' has NaN or inf"),
    ("inf gradient", _push_frames(INF, 57), "'b' has NaN or inf"),
    ("unregistered worker", _push_frames(G, 58, wid=1), "worker 1 is not registered"),
    ("worker id out of range", _push_frames(G, 59, wid=7), "out of range"),
    ("gradient from the future", _push_frames(G, 60, ver=99), "server is at 0"),
    ("old protocol version", [_header(v=0), *_frames_of(G)], "not spoken"),
    ("topk index out of range", encode(
        {"op": "push", "wid": 0, "seq": 61, "ver": 0},
        [Entry(k, a.dtype, a.shape, [np.array([a.size], np.int32), np.ones(1, np.float32)],
               {"k": 1}) for k, a in PARAMS.items()], codec="topk"), "out of range"),
]


def test_malformed_messages_are_rejected_and_change_nothing():
    with serving(optimizer="momentum", optimizer_config={"lr": 0.5}, mode="async",
                 num_workers=2) as server:
        raw = RawWorker(server.address)
        try:
            raw.rpc(_push_frames({}, 1, op="register"))
            before = _pull(raw, 2)
            for i, (name, frames, match) in enumerate(MALFORMED):
                reply = raw.rpc(frames)
                assert reply.header["status"] == "error", name
                assert re.search(match, reply.header["message"]), (name, reply.header["message"])
                assert server.stats()["rejected"] == i + 1, name
            after = _pull(raw, 3)
            for k in PARAMS:
                np.testing.assert_array_equal(after[k], before[k])
            stats = server.stats()
            assert stats["version"] == 0 and stats["pushes_applied"] == 0
            assert raw.rpc(_push_frames(G, 100)).header["status"] == "ok"  # still serving
            assert server.stats()["version"] == 1
        finally:
            raw.close()


# ---- transport --------------------------------------------------------------------------
def test_bind_port_zero_reports_the_port_and_options_apply():
    opts = transport.SocketOptions(linger_ms=123, max_message_bytes=1 << 20,
                                   heartbeat_ivl_ms=500)
    router, address = transport.bind_router("tcp://127.0.0.1:0", options=opts)
    try:
        assert address.startswith("tcp://127.0.0.1:") and int(address.rsplit(":", 1)[1]) > 0
        assert router.getsockopt(zmq.LINGER) == 123
        assert router.getsockopt(zmq.MAXMSGSIZE) == 1 << 20
        assert router.getsockopt(zmq.HEARTBEAT_IVL) == 500
        dealer = transport.connect_dealer(address)
        try:
            a = np.arange(100_000, dtype=np.float32)  # above pyzmq's copy threshold
            tracker = transport.send_frames(dealer, [b"hdr", a], track=True)
            frames = transport.recv_frames(router, 5.0)
            assert frames is not None and len(frames) == 3
            np.testing.assert_array_equal(np.frombuffer(frames[2].buffer, np.float32), a)
            tracker.wait(5.0)
            assert transport.frames_nbytes([b"hdr", a]) == 3 + a.nbytes
            assert transport.recv_frames(router, 0.01) is None  # nothing more: times out
        finally:
            dealer.close(linger=0)
    finally:
        router.close(linger=0)


def test_bind_wildcard_and_errors():
    router, address = transport.bind_router("tcp://*:0")
    try:
        assert address.startswith("tcp://0.0.0.0:")
        port = address.rsplit(":", 1)[1]
        with pytest.raises(transport.TransportError, match="cannot bind"):
            transport.bind_router(f"tcp://127.0.0.1:{port}")
    finally:
        router.close(linger=0)
    with pytest.raises(NotImplementedError, match="CURVE"):
        transport.make_socket(zmq.DEALER, security={"curve": "keys"})


# ---- sharding ---------------------------------------------------------------------------
LENET = {"0.weight": (300, 784), "0.bias": (300,), "2.weight": (100, 300), "2.bias": (100,),
         "4.weight": (10, 100), "4.bias": (10,)}


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_plan_balances_bytes(k):
    plan = sharding.plan_shards(LENET, k)
    loads = plan.server_bytes(4)
    total = sum(math.prod(s) for s in LENET.values()) * 4
    assert sum(loads) == total == 1_066_440
    # each cut lands within half a row (<= 3136 bytes) or half a small tensor of its ideal
    assert max(abs(x - total / k) for x in loads) <= 2 * 784 * 4
    assert plan == sharding.plan_shards(LENET, k)  # deterministic


def test_plan_splits_only_large_tensors_by_rows():
    plan = sharding.plan_shards(LENET, 2)
    split_names = {p.name for p in plan.pieces if p.split}
    assert split_names == {"0.weight"}
    assert [p.key for p in plan.pieces if p.split][0].startswith("0.weight[0:")
    single = sharding.plan_shards({"a": (4,), "b": (3,)}, 2)  # tiny: whole tensors
    assert not any(p.split for p in single.pieces)
    assert {p.server for p in single.pieces} == {0, 1}
    many = sharding.plan_shards({"a": (2,)}, 3)  # more servers than tensors: some empty
    assert [many.server_keys(i) for i in range(3)] == [[], ["a"], []]


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_split_gather_roundtrip_is_exact(k):
    rng = np.random.default_rng(k)
    arrays = {n: rng.standard_normal(s).astype(np.float32) for n, s in LENET.items()}
    plan = sharding.plan_shards(LENET, k, min_split_bytes=1024)
    parts = sharding.split(arrays, plan)
    for server, part in enumerate(parts):
        assert list(part) == plan.server_keys(server)
        for key, a in part.items():
            # row ranges are views of the caller's array: nothing is copied
            assert a.flags.c_contiguous and np.shares_memory(a, arrays[sharding.key_name(key)])
    back = sharding.gather(parts, plan)
    for n in arrays:
        np.testing.assert_array_equal(back[n], arrays[n])
    out = {n: np.empty_like(a) for n, a in arrays.items()}
    back2 = sharding.gather(parts, plan, out=out)
    assert all(back2[n] is out[n] for n in arrays)
    np.testing.assert_array_equal(out["0.weight"], arrays["0.weight"])
    rebuilt = sharding.plan_from_layouts([plan.server_shapes(i) for i in range(k)])
    assert rebuilt.shapes == plan.shapes and set(rebuilt.pieces) == set(plan.pieces)


@settings(max_examples=50, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(0, 40), min_size=0, max_size=3), min_size=1,
                       max_size=8),
       k=st.integers(1, 6), min_split=st.sampled_from([0, 64, 4096]))
def test_plan_property(shapes, k, min_split):
    named = {f"p{i}": tuple(s) for i, s in enumerate(shapes)}
    plan = sharding.plan_shards(named, k, min_split_bytes=min_split)
    rows_seen = {}
    for p in plan.pieces:
        assert 0 <= p.server < k
        rows_seen.setdefault(p.name, []).append((p.start, p.stop))
    for name, shape in named.items():
        spans = sorted(rows_seen[name])
        rows = shape[0] if shape else 1
        assert spans[0][0] == 0 and spans[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(spans[:-1], spans[1:], strict=True))
    arrays = {n: np.arange(math.prod(s), dtype=np.float32).reshape(s) for n, s in named.items()}
    back = sharding.gather(sharding.split(arrays, plan), plan)
    for n in named:
        np.testing.assert_array_equal(back[n], arrays[n])


def test_plan_errors():
    with pytest.raises(ValueError, match="at least one server"):
        sharding.plan_shards(LENET, 0)
    with pytest.raises(ValueError, match="looks like a shard key"):
        sharding.plan_shards({"w[0:3]": (3,)}, 1)
    with pytest.raises(KeyError, match="lack"):
        sharding.split({}, sharding.plan_shards(LENET, 2))
    with pytest.raises(ValueError, match="do not tile"):
        sharding.plan_from_layouts([{"w[0:2]": (2, 3)}, {"w[3:5]": (2, 3)}])
    with pytest.raises(ValueError, match="two servers"):
        sharding.plan_from_layouts([{"w": (2,)}, {"w": (2,)}])
