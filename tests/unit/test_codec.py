"""conveyor.codec: AES-GCM sealing of payloads, results and errors, key rotation, binding."""

from __future__ import annotations

import base64

import pytest

from conveyor.codec import (
    SEALED_OVERHEAD,
    AesGcmCodec,
    SealError,
    is_sealed,
    is_sealed_text,
    kept_text,
    open_text,
    seal_text,
    sealed_key_id,
)
from conveyor.errors import ConfigError

TASK = "0191f3a2-7c4e-7d7a-9a55-5b1f2f0d0c01"
OTHER_TASK = "0191f3a2-7c4e-7d7a-9a55-5b1f2f0d0c02"


@pytest.fixture
def codec() -> AesGcmCodec:
    return AesGcmCodec([("k2", b"\x02" * 32), ("k1", b"\x01" * 32)])


class TestSealing:
    def test_round_trip_and_the_ciphertext_hides_the_data(self, codec: AesGcmCodec) -> None:
        secret = b"card=4111111111111111"
        sealed = codec.seal(secret, field="payload", task_id=TASK)
        assert is_sealed(sealed)
        assert secret not in sealed
        assert sealed_key_id(sealed) == "k2"
        assert len(sealed) <= len(secret) + SEALED_OVERHEAD
        assert codec.open(sealed, field="payload", task_id=TASK) == secret
        # Fresh nonce each time: equal payloads do not look equal in the database.
        assert sealed != codec.seal(secret, field="payload", task_id=TASK)

    def test_the_task_id_is_compared_in_canonical_form(self, codec: AesGcmCodec) -> None:
        sealed = codec.seal(b"x", field="payload", task_id=TASK.upper())
        assert codec.open(sealed, field="payload", task_id=TASK) == b"x"

    def test_sealed_data_is_bound_to_its_task_and_field(self, codec: AesGcmCodec) -> None:
        sealed = codec.seal(b"x", field="payload", task_id=TASK)
        with pytest.raises(SealError, match="another task or field"):
            codec.open(sealed, field="payload", task_id=OTHER_TASK)
        with pytest.raises(SealError):
            codec.open(sealed, field="result", task_id=TASK)

    def test_altered_data_does_not_open(self, codec: AesGcmCodec) -> None:
        sealed = bytearray(codec.seal(b"amount=10", field="payload", task_id=TASK))
        sealed[-1] ^= 1
        with pytest.raises(SealError, match="altered"):
            codec.open(bytes(sealed), field="payload", task_id=TASK)

    def test_plain_data_passes_through(self, codec: AesGcmCodec) -> None:
        assert codec.open(b"plain", field="payload", task_id=TASK) == b"plain"
        assert codec.open(b"", field="payload", task_id=TASK) == b""


class TestKeys:
    def test_rotation_new_key_seals_old_keys_still_open(self) -> None:
        old = AesGcmCodec([("k1", b"\x01" * 32)])
        sealed_before = old.seal(b"before", field="payload", task_id=TASK)
        rotated = AesGcmCodec([("k2", b"\x02" * 32), ("k1", b"\x01" * 32)])
        assert rotated.open(sealed_before, field="payload", task_id=TASK) == b"before"
        sealed_after = rotated.seal(b"after", field="payload", task_id=TASK)
        assert sealed_key_id(sealed_after) == "k2"
        with pytest.raises(SealError, match="key 'k2', which this codec does not have"):
            old.open(sealed_after, field="payload", task_id=TASK)

    @pytest.mark.parametrize(
        ("keys", "message"),
        [
            ([], "at least one key"),
            ([("k1", b"short")], "must be 32 bytes"),
            ([("bad id!", b"\x00" * 32)], "key id must be"),
            ([("k", b"\x00" * 32), ("k", b"\x01" * 32)], "appears twice"),
        ],
    )
    def test_bad_keys_are_config_errors(self, keys: list[tuple[str, bytes]], message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            AesGcmCodec(keys)

    def test_keys_from_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("CONVEYOR_PAYLOAD_KEYS", raising=False)
        assert AesGcmCodec.from_env() is None
        new, old = AesGcmCodec.new_key(), AesGcmCodec.new_key()
        monkeypatch.setenv(
            "CONVEYOR_PAYLOAD_KEYS",
            f"k2={base64.b64encode(new).decode()}, k1={base64.b64encode(old).decode()}",
        )
        codec = AesGcmCodec.from_env()
        assert codec is not None
        assert codec.current_key_id == "k2"
        monkeypatch.setenv("CONVEYOR_PAYLOAD_KEYS", "k1=not-base64!")
        with pytest.raises(ConfigError, match=r"key of item 1 \(k1\) is not valid base64"):
            AesGcmCodec.from_env()

    def test_a_url_safe_key_is_accepted(self, monkeypatch: pytest.MonkeyPatch) -> None:
        key = bytes([0xFB]) * 32  # its base64 has '+' and '/', its URL-safe form '-' and '_'
        monkeypatch.setenv("CONVEYOR_PAYLOAD_KEYS", f"k1={base64.urlsafe_b64encode(key).decode()}")
        from_url_safe = AesGcmCodec.from_env()
        assert from_url_safe is not None
        sealed = AesGcmCodec([("k1", key)]).seal(b"data", field="payload", task_id=TASK)
        assert from_url_safe.open(sealed, field="payload", task_id=TASK) == b"data"

    @pytest.mark.parametrize(
        ("template", "message"),
        [
            ("k2:{key}", "item 1 is not id=BASE64KEY"),  # a colon for the '='
            ("k1={key}x", r"key of item 1 \(k1\)"),  # a stray character after the key
            ("k1={key},k2 {key}", "item 2 is not id=BASE64KEY"),
        ],
    )
    def test_a_malformed_item_is_named_without_its_key(
        self, monkeypatch: pytest.MonkeyPatch, template: str, message: str
    ) -> None:
        key = base64.b64encode(AesGcmCodec.new_key()).decode()
        monkeypatch.setenv("CONVEYOR_PAYLOAD_KEYS", template.format(key=key))
        with pytest.raises(ConfigError, match=message) as refused:
            AesGcmCodec.from_env()
        # Not the key, nor any long piece of it.
        assert key[:12] not in str(refused.value)


class TestText:
    def test_errors_seal_into_text_and_back(self, codec: AesGcmCodec) -> None:
        sealed = seal_text(codec, "ValueError: password=hunter2", field="error", task_id=TASK)
        assert is_sealed_text(sealed)
        assert "hunter2" not in sealed
        assert sealed.isascii()
        assert open_text(codec, sealed, field="error", task_id=TASK) == (
            "ValueError: password=hunter2"
        )
        assert open_text(codec, "LeaseExpired: plain", field="error", task_id=TASK) == (
            "LeaseExpired: plain"
        )
        with pytest.raises(SealError, match="damaged"):
            open_text(codec, "cvy-sealed:v1:%%%", field="error", task_id=TASK)


class TestLongText:
    @pytest.mark.parametrize("character", ["a", "é", "日", "🙂"])
    def test_a_long_message_is_cut_to_fit_the_servers_limit_and_still_opens(
        self, codec: AesGcmCodec, character: str
    ) -> None:
        """The server keeps 8,000 characters of an error: a sealed one must fit whole."""
        message = character * 9000
        sealed = seal_text(codec, message, field="error", task_id=TASK)
        assert len(sealed) <= 8000
        opened = open_text(codec, sealed, field="error", task_id=TASK)
        assert opened == message[: len(opened)]
        assert len(opened.encode()) > 5000

    def test_a_codec_with_a_larger_envelope_still_fits(self) -> None:
        """A codec carrying, say, a wrapped data key adds more than AES-GCM's 74 bytes."""

        class Enveloped:
            def __init__(self, inner: AesGcmCodec) -> None:
                self.inner = inner

            def seal(self, data: bytes, *, field: str, task_id: str) -> bytes:
                return self.inner.seal(data, field=field, task_id=task_id) + b"k" * 400

            def open(self, data: bytes, *, field: str, task_id: str) -> bytes:
                return self.inner.open(data[:-400], field=field, task_id=task_id)

        codec = Enveloped(AesGcmCodec([("k1", b"\x01" * 32)]))
        sealed = seal_text(codec, "x" * 9000, field="error", task_id=TASK)
        assert len(sealed) <= 8000
        assert set(open_text(codec, sealed, field="error", task_id=TASK)) == {"x"}

    def test_an_unsealed_text_is_cut_to_what_the_server_keeps(self) -> None:
        """Before it is sent: a progress note of megabytes made every heartbeat that carried
        it too large for the server, and the worker lost every lease it held."""
        assert kept_text("short") == "short"
        assert kept_text("x" * 8000) == "x" * 8000
        cut = kept_text("x" * 20_000_000)
        assert cut == "x" * 8000 + "... (truncated)"
