import dataclasses

import h5py
import numpy as np
import pytest
import torch

from jowa_core.config import preset
from jowa_core.data.format import DatasetWriter
from jowa_core.data.token_cache import (
    TokenCacheError,
    build_token_cache,
    open_token_cache,
    read_token_cache,
    token_cache_path,
)
from jowa_core.models.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tokenizer(seed):
    torch.manual_seed(seed)
    tok = Tokenizer(preset("tiny").tokenizer).eval()
    with torch.no_grad():  # a spread-out codebook, so that frames get many different tokens
        tok.embedding.weight.normal_()
    return tok


def _dataset(path, lengths=(130, 170, 20), lives=False):
    rng = np.random.default_rng(0)
    with DatasetWriter(path, "Pong", source="collected") as w:
        for t in lengths:  # 320 frames: crosses the 256-frame HDF5 chunk
            w.add_episode(
                rng.integers(0, 256, (t, 84, 84), dtype=np.uint8),
                rng.integers(0, 18, t),
                rng.choice([-1.0, 0.0, 1.0], t),
                np.r_[np.zeros(t - 1, bool), True],
                lives=np.sort(rng.integers(0, 4, t))[::-1] if lives else None,
            )
    return path


@pytest.mark.parametrize("lives", [False, True])
def test_round_trip(tmp_path, lives):
    src = _dataset(tmp_path / "Pong.h5", lives=lives)
    tok = _tokenizer(0)
    out = build_token_cache(src, tok, batch_size=100, device="cpu", progress=False)
    assert out == tmp_path / "Pong.tokens.h5" == token_cache_path(src)
    with h5py.File(src) as f:
        frames = torch.from_numpy(f["observations"][:])
        keys = ("actions", "rewards", "terminals", "truncations", "episode_starts", "lives")
        source = {k: f[k][:] for k in keys if k in f}
    assert ("lives" in source) == lives
    expected = torch.cat([tok.encode(frames[i : i + 64]) for i in range(0, len(frames), 64)]).numpy()
    cache = read_token_cache(out, expected_hash=tok)
    assert cache["tokens"].dtype == np.uint16 and cache["tokens"].shape == (320, 36)
    np.testing.assert_array_equal(cache["tokens"], expected)
    for k, v in source.items():
        np.testing.assert_array_equal(cache[k], v)
    a = cache["attrs"]
    assert (a["game"], a["task_id"], a["source_num_transitions"]) == ("Pong", 39, 320)
    assert a["tokenizer_hash"] == tok.content_hash() and a["source_path"] == str(src.resolve())
    decoded = tok.decode(torch.from_numpy(cache["tokens"][:2].astype(np.int64)))
    torch.testing.assert_close(decoded, tok.decode(tok.encode(frames[:2])))
    assert not list(tmp_path.glob("*.partial"))


def test_refuses_a_cache_made_by_another_tokenizer(tmp_path):
    src = _dataset(tmp_path / "Pong.h5", lengths=(30,))
    tok, other = _tokenizer(0), _tokenizer(1)
    out = build_token_cache(src, tok, out_path=tmp_path / "c" / "p.tokens.h5", device="cpu", progress=False)
    with open_token_cache(out, expected_hash=tok.content_hash()) as f:
        assert f["tokens"].shape == (30, 36)
    with pytest.raises(TokenCacheError) as e:
        open_token_cache(out, expected_hash=other)
    msg = str(e.value)
    assert tok.content_hash()[:16] in msg and other.content_hash()[:16] in msg
    assert "Rebuild it with build_token_cache" in msg and str(src.resolve()) in msg
    # same weights, different training-only settings: same tokens, accepted
    same = Tokenizer(dataclasses.replace(tok.cfg, changed_pixel_weight=0.0))
    same.load_state_dict(tok.state_dict())
    open_token_cache(out, expected_hash=same).close()


def test_malformed_caches_are_explained(tmp_path):
    with pytest.raises(TokenCacheError, match="no such file"):
        open_token_cache(tmp_path / "none.tokens.h5")
    (tmp_path / "junk.tokens.h5").write_bytes(b"not hdf5")
    with pytest.raises(TokenCacheError, match="not a readable HDF5"):
        open_token_cache(tmp_path / "junk.tokens.h5")
    src = _dataset(tmp_path / "Pong.h5", lengths=(30,))
    out = build_token_cache(src, _tokenizer(0), device="cpu", progress=False)
    with h5py.File(out, "a") as f:
        f.attrs["source_num_transitions"] = 31
    with pytest.raises(TokenCacheError, match="30 token rows but its source had 31"):
        open_token_cache(out)
    with pytest.raises(TokenCacheError, match="not a token cache"):
        open_token_cache(src)  # a dataset, not a cache


def test_failed_build_leaves_nothing(tmp_path):
    src = _dataset(tmp_path / "Pong.h5", lengths=(30,))
    tok = _tokenizer(0)

    def boom(frames):
        raise RuntimeError("simulated crash")

    tok.encode = boom
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_token_cache(src, tok, device="cpu", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Pong.h5"]
