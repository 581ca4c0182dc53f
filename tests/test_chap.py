"""CHAP: RFC 1994 response values, encodings, one-way and mutual exchanges."""

import base64
import hashlib

import pytest

from fetd_tcp import chap
from fetd_tcp.chap import ChapError, Credentials, Secret, TargetChap

SECRET = Secret("initiator-secret-12")
TSECRET = Secret("target-secret-3456")


def fixed_random(n):
    return bytes(range(1, n + 1)) if n > 1 else b"\x2a"


def test_md5_vector_by_hand():
    challenge = bytes.fromhex("0102030405060708090a0b0c0d0e0f10")
    expect = hashlib.md5(b"\x07" + b"initiator-secret-12" + challenge).digest()
    assert chap.response(5, 7, SECRET, challenge) == expect
    # A fixed RFC 1994 value: MD5(0x01 || "secret" || 16 zero bytes).
    assert chap.response(5, 1, Secret("secret"), bytes(16)).hex() == \
        hashlib.md5(b"\x01secret" + bytes(16)).hexdigest()
    assert chap.verify(5, 7, SECRET, challenge, expect)
    assert not chap.verify(5, 8, SECRET, challenge, expect)


@pytest.mark.parametrize("alg,name", [(5, "md5"), (6, "sha1"), (7, "sha256"),
                                      (8, "sha3_256")])
def test_algorithms(alg, name):
    got = chap.response(alg, 255, SECRET, b"c" * 32)
    assert got == hashlib.new(name, b"\xff" + SECRET.reveal() + b"c" * 32).digest()
    assert chap.challenge_length(alg) >= max(16, len(got))


def test_binary_encodings():
    data = bytes(range(20))
    assert chap.decode_binary(chap.encode_binary(data)) == data
    assert chap.decode_binary(chap.encode_binary(data, True)) == data
    assert chap.decode_binary("0X" + data.hex().upper()) == data
    assert chap.decode_binary("0b" + base64.b64encode(data).decode()) == data
    assert chap.decode_binary("0xabc") == b"\x0a\xbc"
    for bad in ("abcd", "0xzz", "0b!!!", "0x", "0b"):
        with pytest.raises(ChapError):
            chap.decode_binary(bad)


def test_choose_algorithm():
    assert chap.choose_algorithm("7,5") == 7
    assert chap.choose_algorithm("5,7") == 5
    assert chap.choose_algorithm("99,x,5") == 5
    assert chap.choose_algorithm("6", allowed=(5,)) is None


def test_secret_never_shown():
    cred = Credentials("user", "topsecretvalue")
    assert "topsecretvalue" not in repr(cred) and "topsecretvalue" not in str(cred.secret)
    assert isinstance(cred.secret, Secret)


def initiator_answer(offer, user="iqn.user", secret=SECRET, b64=False, extra=()):
    keys = dict(offer)
    alg, ident = int(keys["CHAP_A"]), int(keys["CHAP_I"])
    resp = chap.response(alg, ident, secret, chap.decode_binary(keys["CHAP_C"]))
    return {"CHAP_N": user, "CHAP_R": chap.encode_binary(resp, b64), **dict(extra)}


@pytest.mark.parametrize("b64", [False, True])
def test_one_way(b64):
    t = TargetChap(Credentials("iqn.user", SECRET), random=fixed_random)
    offer = t.offer("7,5")
    assert offer == [("CHAP_A", "7"), ("CHAP_I", "42"),
                     ("CHAP_C", "0x" + bytes(range(1, 33)).hex())]
    assert t.check(initiator_answer(offer, b64=b64)) == []


def test_wrong_secret_and_user():
    t = TargetChap(Credentials("iqn.user", SECRET))
    offer = t.offer("5")
    with pytest.raises(ChapError) as e:
        t.check(initiator_answer(offer, secret=Secret("wrong-secret-xx")))
    assert "initiator-secret" not in str(e.value)
    with pytest.raises(ChapError):
        t.check(initiator_answer(offer, user="someone"))
    with pytest.raises(ChapError):
        t.check({"CHAP_N": "iqn.user"})


def test_no_acceptable_algorithm():
    with pytest.raises(ChapError):
        TargetChap(Credentials("u", SECRET), allowed=(7,)).offer("6,99,x")


def test_mutual():
    t = TargetChap(Credentials("iqn.user", SECRET), Credentials("iqn.target", TSECRET))
    offer = t.offer("5")
    my_challenge = b"\x11" * 16
    got = dict(t.check(initiator_answer(
        offer, extra=[("CHAP_I", "9"), ("CHAP_C", chap.encode_binary(my_challenge))])))
    assert got["CHAP_N"] == "iqn.target"
    assert chap.decode_binary(got["CHAP_R"]) == hashlib.md5(
        b"\x09" + TSECRET.reveal() + my_challenge).digest()


def test_mutual_refusals():
    def run(target, extra):
        t = TargetChap(Credentials("iqn.user", SECRET), target)
        offer = t.offer("5")
        extra = [(k, v if v != "REFLECT" else dict(offer)["CHAP_C"]) for k, v in extra]
        return t.check(initiator_answer(offer, extra=extra))

    tcred = Credentials("iqn.target", TSECRET)
    with pytest.raises(ChapError):  # not configured
        run(None, [("CHAP_I", "1"), ("CHAP_C", "0x" + "ab" * 16)])
    with pytest.raises(ChapError):  # reflected challenge
        run(tcred, [("CHAP_I", "1"), ("CHAP_C", "REFLECT")])
    with pytest.raises(ChapError):  # half a challenge
        run(tcred, [("CHAP_C", "0x" + "ab" * 16)])
    with pytest.raises(ChapError):
        run(tcred, [("CHAP_I", "256"), ("CHAP_C", "0x" + "ab" * 16)])
    with pytest.raises(ChapError):  # same secret both ways
        run(Credentials("iqn.target", SECRET), [("CHAP_I", "1"), ("CHAP_C", "0x" + "ab" * 16)])
