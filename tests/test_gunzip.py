"""The export's gzip decoder: every byte out, in bounded blocks, or a clear error."""

from __future__ import annotations

import gzip
import io
import random
import zlib

import pytest

from providers.auth0 import gunzip


def inflate(data: bytes) -> list[bytes]:
    return list(gunzip(io.BytesIO(data).read1))


def test_inflates_what_gzip_wrote() -> None:
    text = b"".join(b'{"user_id": "auth0|%d"}\n' % i for i in range(20_000))
    assert b"".join(inflate(gzip.compress(text))) == text


def test_highly_compressible_data_comes_out_whole_in_bounded_blocks() -> None:
    # 8 MiB that deflate to ~8 KiB: zlib holds output back once a block is full.
    text = b"a" * (8 << 20)
    blocks = inflate(gzip.compress(text))
    assert b"".join(blocks) == text
    assert max(map(len, blocks)) <= 1 << 20


def test_members_are_concatenated_like_gzip_reads_them() -> None:
    data = gzip.compress(b"first\n") + gzip.compress(b"") + gzip.compress(b"second\n")
    assert b"".join(inflate(data)) == gzip.decompress(data) == b"first\nsecond\n"


def test_empty_download_is_an_empty_file() -> None:
    assert inflate(b"") == []


def test_incompressible_data_arriving_in_small_reads() -> None:
    text = random.Random(7).randbytes(300_000)
    source = io.BytesIO(gzip.compress(text))
    assert b"".join(gunzip(lambda n: source.read1(min(n, 1000)))) == text


@pytest.mark.parametrize("cut", [5, 100, 30_000, -9, -1])
def test_a_cut_file_raises_once_its_bytes_run_out(cut: int) -> None:
    text = random.Random(1).randbytes(50_000)
    data = gzip.compress(text)
    source = io.BytesIO(data[:cut])
    out: list[bytes] = []
    with pytest.raises(EOFError):
        out.extend(gunzip(source.read1))
    assert text.startswith(b"".join(out))


def test_a_wrong_checksum_raises() -> None:
    data = bytearray(gzip.compress(b"hello\n"))
    data[-5] ^= 0xFF  # inside the CRC-32 of the trailer
    with pytest.raises(zlib.error):
        inflate(bytes(data))


def test_bytes_after_a_member_that_are_not_gzip_raise() -> None:
    with pytest.raises(zlib.error):
        inflate(gzip.compress(b"ok\n") + b"garbage")
