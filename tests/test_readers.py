"""``ditas.readers`` and the readers routed through it: hostile and careless files give one-line
``DitasError``s (no traceback, no advice to load unsafely, no large allocation), and the silent-garbage
cases of issue 19 (``sigma = -I``, NaN in a reference cache, a ``cp -p`` stale cache, a resume with
another batch size, a zero-filled shard) are refused or recomputed."""

from __future__ import annotations

import io
import json
import os
import shutil
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ditas.errors import DitasError
from ditas.evaluation import adm
from ditas.evaluation.adm import NpzImages
from ditas.readers import ArraySpec, Field, json_depth, read_json, read_npz_arrays, safe_reason

# no shrinking: failures print as found. Fresh random inputs on every developer run; under CI
# (CI=true) the same examples every time, so a new find shows here first and never blocks a landing
# at random (each find becomes a named regression test, as the tokenize case below).
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck),
                phases=(Phase.explicit, Phase.reuse, Phase.generate), derandomize=bool(os.environ.get("CI")))
MEMORY_BOUND = 32 << 20  # bytes a reader may allocate on these small files
DEFAULT_DIT = Path(__file__).resolve().parents[1] / "src" / "ditas" / "assets" / "default_dit"


def only_clean_errors(fn, *args, bound: int = MEMORY_BOUND, **kwargs):
    """Runs ``fn``; returns its result or the DitasError it raised, after checking the error is one
    line without unsafe-loading advice and that no more than ``bound`` bytes were allocated."""
    tracemalloc.start()
    try:
        result = fn(*args, **kwargs)
    except DitasError as exc:
        result = exc
        text = str(exc)
        assert "\n" not in text and "allow_pickle" not in text and "weights_only=False" not in text, text
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < bound, f"{fn.__name__} allocated {peak} bytes"
    return result


def npy_bytes(shape, descr: str, data: bytes) -> bytes:
    """An .npy member whose header claims ``shape`` whatever ``data`` really holds."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue() + data


def write_npz(path: Path, members: dict[str, bytes], compress: bool = False) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        for name, raw in members.items():
            zf.writestr(f"{name}.npy", raw)
    return path


def member_of(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# hypothesis strategies: a mutation of a valid file's bytes, a wrongly typed or lying array member
mutations = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("zero"), st.floats(0, 1), st.integers(1, 4096)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=64)),
)


def mutate(raw: bytes, m) -> bytes:
    at = int(m[1] * len(raw))
    if m[0] == "truncate":
        return raw[:at]
    if m[0] == "flip":
        return raw[:at] + m[2] + raw[at + len(m[2]):]
    if m[0] == "zero":
        return raw[:at] + bytes(min(m[2], len(raw) - at)) + raw[at + m[2]:]
    return raw[:at] + m[2] + raw[at:]


dtypes = st.sampled_from(["|u1", "<i8", "<f4", "<f8", "<U3", "|b1", "<c8", "|O"])
shapes = st.lists(st.integers(0, 10**9), min_size=0, max_size=4).map(tuple)
lying_members = st.tuples(shapes, dtypes, st.binary(max_size=256))
json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats(allow_nan=False)
                           | st.text(max_size=8), lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8)


def json_mutation(raw: bytes, choice: int, m, value, depth: int) -> bytes:
    """A broken variant of a JSON text: mutated bytes, a field of another type, deep nesting, a
    top-level list, or a number out of range."""
    if choice == 0:
        return mutate(raw, m)
    data = json.loads(raw)
    if choice == 1 and isinstance(data, dict) and data:
        key = sorted(data)[int(m[1] * (len(data) - 1))]
        data[key] = value
        return json.dumps(data).encode()
    if choice == 2:
        return b"[" * depth + b"]" * depth
    if choice == 3:
        return b"[1, 2]"
    return raw.replace(b"}", b', "big": 1e400}', 1)


# ----------------------------------------------------------------------------------------------
#                                       the readers themselves
# ----------------------------------------------------------------------------------------------


def test_json_reader_limits_and_schema(tmp_path):
    p = tmp_path / "c.json"
    p.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(DitasError, match="nested 100000 levels"):
        read_json(p, "config")
    p.write_text('{"a": "[[[[[[" }')
    assert read_json(p, "config", max_depth=1) == {"a": "[[[[[["}  # brackets inside strings do not count
    assert json_depth(b'{"x": "\\"[[", "y": [[1]]}') == 3
    p.write_text('{"n": {"k": 0}}')
    with pytest.raises(DitasError, match=r"field 'n.k' must be in \[1"):
        read_json(p, "config", {"n": Field(dict, schema={"k": Field(int, lo=1)})})
    with pytest.raises(DitasError, match="field 'n.m' is missing"):
        read_json(p, "config", {"n": Field(dict, schema={"m": Field(str)})})
    p.write_text('{"n": true}')
    with pytest.raises(DitasError, match="must be an integer, got true"):
        read_json(p, "config", {"n": Field(int)})
    p.write_text('{"n": NaN}')
    with pytest.raises(DitasError, match="not valid JSON"):
        read_json(p, "config")
    p.write_bytes(b"{" + b" " * (17 << 20) + b"}")
    with pytest.raises(DitasError, match="larger than 16 MiB"):
        read_json(p, "config")
    with pytest.raises(DitasError, match="is a folder"):
        read_json(tmp_path, "config")


def test_npz_header_claiming_a_billion_images_allocates_nothing(tmp_path):
    p = write_npz(tmp_path / "big.npz", {"arr_0": npy_bytes((10**9, 256, 256, 3), "|u1", bytes(4096))})
    err = only_clean_errors(NpzImages, p)
    assert isinstance(err, DitasError) and "claims shape (1000000000, 256, 256, 3)" in str(err)
    # the same claim in a compressed member: the declared size cannot come out of so few bytes
    p = write_npz(tmp_path / "bigz.npz", {"arr_0": npy_bytes((10**9, 256, 256, 3), "|u1", bytes(4096))}, True)
    assert isinstance(only_clean_errors(read_npz_arrays, p, "x", {"arr_0": ArraySpec("u")}), DitasError)


def test_npz_reader_refuses_npy_pickles_and_wrong_types(tmp_path):
    np.save(tmp_path / "plain.npy", np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(DitasError, match="plain .npy array"):
        NpzImages(tmp_path / "plain.npy")
    np.savez(tmp_path / "obj.npz", arr_0=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DitasError, match="Python objects") as exc:
        NpzImages(tmp_path / "obj.npz")
    assert "allow_pickle" not in str(exc.value)
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 4, 4, 3), np.uint8), mu=np.array("abc"), sigma=np.eye(2),
             mu_s=np.zeros(2), sigma_s=np.eye(2))
    with pytest.raises(DitasError, match="'mu' has dtype <U3"):
        adm._npz_stats(NpzImages(tmp_path / "ref.npz"))


def test_library_advice_is_removed_from_messages():
    exc = RuntimeError("Weights only load failed.\nRe-running `torch.load` with `weights_only` set to `False` "
                       "will likely succeed, but it can result in arbitrary code execution.\nbad thing")
    assert safe_reason(exc) == "bad thing"
    assert "allow_pickle" not in safe_reason(ValueError("Object arrays cannot be loaded when allow_pickle=False"))


def test_eval_inception_head_that_pickles_code_is_refused_without_advice(tmp_path):
    import torch

    from ditas.evaluation.inception import load_logits_weight

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"fc.weight": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(DitasError) as exc:
        load_logits_weight(tmp_path / "evil.pt")
    assert "weights_only" not in str(exc.value) and "\n" not in str(exc.value)


# ----------------------------------------------------------------------------------------------
#                                   fuzz: one test per reader kind
# ----------------------------------------------------------------------------------------------


@FUZZ
@given(choice=st.integers(0, 4), m=mutations, value=json_values, depth=st.integers(65, 200000))
def test_fuzz_json_model_config(tmp_path_factory, choice, m, value, depth):
    from ditas.loaders import load_dit

    folder = tmp_path_factory.mktemp("model")
    (folder / "model.safetensors").symlink_to(DEFAULT_DIT / "model.safetensors")
    (folder / "config.json").write_bytes(json_mutation((DEFAULT_DIT / "config.json").read_bytes(), choice, m,
                                                       value, depth))
    result = only_clean_errors(load_dit, folder, bound=256 << 20)  # the model itself: about 70 MB
    assert isinstance(result, (DitasError, __import__("torch").nn.Module))


@FUZZ
@given(choice=st.integers(0, 4), m=mutations, value=json_values, depth=st.integers(65, 200000))
def test_fuzz_json_pipeline_files(tmp_path_factory, choice, m, value, depth):
    from ditas.pipelines import read_pipeline_ref
    from ditas.quantization.checkpoint import read_config

    folder = tmp_path_factory.mktemp("q")
    good = {"pipeline": "/x", "pipeline_class": "PixArtSigmaPipeline", "transformer_class": "T"}
    (folder / "pipeline.json").write_bytes(json_mutation(json.dumps(good).encode(), choice, m, value, depth))
    (folder / "config.json").write_bytes(json_mutation(b'{"quantization": {"a": 1}}', choice, m, value, depth))
    for fn in (read_pipeline_ref, read_config):
        result = only_clean_errors(fn, folder)
        assert isinstance(result, (DitasError, dict))


@FUZZ
@given(choice=st.integers(0, 4), m=mutations, value=json_values, depth=st.integers(65, 200000))
def test_fuzz_shard_manifest(tmp_path_factory, choice, m, value, depth):
    from ditas.diffusion.sharded import read_manifest

    folder = tmp_path_factory.mktemp("shards")
    good = {"format": "ditas-sample-shards", "num": 4, "shard_size": 2, "batch_size": 2, "labels_sha256": "ab",
            "settings": {"steps": 2}, "image_shape": [8, 8, 3], "model": "m"}
    (folder / "run.json").write_bytes(json_mutation(json.dumps(good).encode(), choice, m, value, depth))
    result = only_clean_errors(read_manifest, folder)
    if isinstance(result, dict):  # what passes is what the sampler relies on
        assert isinstance(result["shard_size"], int) and not isinstance(result["shard_size"], bool)
        assert result["shard_size"] >= 1 and all(isinstance(s, int) and s >= 1 for s in result["image_shape"])


@FUZZ
@given(kind=st.integers(0, 1), m=mutations, member=lying_members)
def test_fuzz_npz_samples(tmp_path_factory, kind, m, member):
    from ditas.evaluation.protocol import read_samples

    folder = tmp_path_factory.mktemp("s")
    path = folder / "s.npz"
    rng = np.random.default_rng(0)
    good = {"arr_0": member_of(rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)),
            "labels": member_of(np.arange(6))}
    if kind == 0:
        buf = io.BytesIO()
        write_npz(path, good)
        path.write_bytes(mutate(path.read_bytes(), m))
    else:
        shape, descr, data = member
        write_npz(path, {**good, "arr_0": npy_bytes(shape, descr, data)})

    def read_all(p):
        images = NpzImages(p)
        return sum(len(b) for b in images.batches(4)), read_samples(p)

    result = only_clean_errors(read_all, path)
    if not isinstance(result, DitasError):
        n, (images, labels) = result
        assert n == len(images) == len(labels) and images.dtype == np.uint8


@FUZZ
@given(m=mutations, member=lying_members, which=st.sampled_from(["mu", "sigma", "mu_s", "sigma_s"]),
       mode=st.integers(0, 2))
def test_fuzz_npz_reference(tmp_path_factory, m, member, which, mode):
    folder = tmp_path_factory.mktemp("r")
    path = folder / "ref.npz"
    good = {"arr_0": member_of(np.zeros((4, 8, 8, 3), np.uint8)), "mu": member_of(np.zeros(3)),
            "sigma": member_of(np.eye(3)), "mu_s": member_of(np.zeros(2)), "sigma_s": member_of(np.eye(2))}
    if mode == 0:
        write_npz(path, {**good, which: npy_bytes(*member)})
    elif mode == 1:
        write_npz(path, good)
        path.write_bytes(mutate(path.read_bytes(), m))
    else:  # well-formed arrays with bad values
        bad = {"mu": np.full(3, np.nan), "sigma": -np.eye(3), "mu_s": np.zeros(5), "sigma_s": np.ones((2, 3))}
        write_npz(path, {**good, which: member_of(bad[which])})
        assert isinstance(only_clean_errors(lambda p: adm._npz_stats(NpzImages(p)), path), DitasError)
        return
    result = only_clean_errors(lambda p: adm._npz_stats(NpzImages(p)), path)
    if not isinstance(result, DitasError):
        stats = result[0]
        assert np.isfinite(stats.sigma).all() and np.linalg.eigvalsh(stats.sigma).min() > -1e-6


def cache_members(n: int = 5, d: int = 3) -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    pool = rng.normal(size=(n, d)).astype(np.float32)
    return {"format": member_of(np.array(adm.CACHE_FORMAT)), "key": member_of(np.array("K")),
            "pool": member_of(pool), "mu": member_of(pool.mean(0).astype(np.float64)),
            "sigma": member_of(np.cov(pool, rowvar=False)), "mu_s": member_of(np.zeros(2)),
            "sigma_s": member_of(np.eye(2)), "stats_source": member_of(np.array("features"))}


@FUZZ
@given(m=mutations, member=lying_members, which=st.sampled_from(sorted(cache_members())), mode=st.integers(0, 1))
def test_fuzz_reference_cache(tmp_path_factory, m, member, which, mode):
    path = tmp_path_factory.mktemp("c") / "cache.npz"
    if mode == 0:
        write_npz(path, {**cache_members(), which: npy_bytes(*member)})
    else:
        write_npz(path, cache_members())
        path.write_bytes(mutate(path.read_bytes(), m))
    result = only_clean_errors(adm._read_cache, path, "K", 5)
    if isinstance(result, adm.Activations):
        assert result.pool.shape == (5, 3) and np.isfinite(result.pool).all()


@FUZZ
@given(m=mutations, member=lying_members, mode=st.integers(0, 1))
def test_fuzz_shard(tmp_path_factory, m, member, mode):
    from ditas.diffusion.sharded import _verified_shard, checksum_path
    from ditas.readers import sha256_file

    path = tmp_path_factory.mktemp("sh") / "images-00000000-00000004.npy"
    np.save(path, np.random.default_rng(2).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    checksum_path(path).write_text(sha256_file(path))
    if mode == 0:
        path.write_bytes(mutate(path.read_bytes(), m))
    else:
        path.write_bytes(npy_bytes(*member))
    result = only_clean_errors(_verified_shard, path, (4, 8, 8, 3))
    if not isinstance(result, DitasError):
        assert result.shape == (4, 8, 8, 3) and result.dtype == np.uint8


# ----------------------------------------------------------------------------------------------
#                               the silent-garbage cases, one test each
# ----------------------------------------------------------------------------------------------


def fake_extractor(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Small deterministic features (pool 6-d, spatial 4-d) of uint8 images: no network needed."""
    x = batch.astype(np.float64) / 255.0
    pool = np.stack([x[..., c].mean((1, 2)) for c in range(3)] + [x[..., c].std((1, 2)) for c in range(3)], 1)
    spatial = x.reshape(len(x), -1)[:, :4]
    return pool, spatial


def images(seed: int, n: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def test_reference_sigma_minus_identity_is_refused(tmp_path):
    """A reference batch with sigma = -I gave FID 0.000 (a negative value clamped to 0)."""
    np.savez(tmp_path / "s.npz", arr_0=images(0))
    np.savez(tmp_path / "ref.npz", arr_0=images(1), mu=np.zeros(6), sigma=-np.eye(6), mu_s=np.zeros(4),
             sigma_s=np.eye(4))
    with pytest.raises(DitasError, match="'sigma' has a negative eigenvalue"):
        adm.evaluate(NpzImages(tmp_path / "s.npz"), NpzImages(tmp_path / "ref.npz"), fake_extractor, progress=False)
    np.savez(tmp_path / "ref2.npz", arr_0=images(1), mu=np.zeros(6), sigma=np.triu(np.ones((6, 6))),
             mu_s=np.zeros(4), sigma_s=np.eye(4))
    with pytest.raises(DitasError, match="not symmetric"):
        adm.evaluate(NpzImages(tmp_path / "s.npz"), NpzImages(tmp_path / "ref2.npz"), fake_extractor, progress=False)


def test_nan_in_cached_pool_features_is_refused(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=images(0))
    np.savez(tmp_path / "ref.npz", arr_0=images(1))
    cache = tmp_path / "cache.npz"
    s, r = NpzImages(tmp_path / "s.npz"), NpzImages(tmp_path / "ref.npz")
    first = adm.evaluate(s, r, fake_extractor, ref_cache=cache, progress=False)
    with np.load(cache) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["pool"][3, 2] = np.nan
    np.savez(cache, **arrays)
    with pytest.raises(DitasError, match="'pool' holds NaN"):
        adm.evaluate(s, r, fake_extractor, ref_cache=cache, progress=False)
    arrays["pool"][3, 2] = 0.5
    arrays["sigma"] = arrays["sigma"][:, :-1]
    np.savez(cache, **arrays)
    with pytest.raises(DitasError, match="'sigma' has shape"):
        adm.evaluate(s, r, fake_extractor, ref_cache=cache, progress=False)
    assert np.isfinite(first["fid"])


def test_cache_of_a_reference_replaced_by_cp_p_is_recomputed(tmp_path):
    """The cache was keyed on name, size and mtime: a copy with the same ones (cp -p, rsync -a) but
    other content got the stale statistics."""
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=images(1))
    np.savez(tmp_path / "s.npz", arr_0=images(0))
    cache = tmp_path / "cache.npz"
    s = NpzImages(tmp_path / "s.npz")
    old = adm.evaluate(s, NpzImages(ref), fake_extractor, ref_cache=cache, progress=False)
    st_before = ref.stat()
    other = tmp_path / "other.npz"
    np.savez(other, arr_0=images(7))
    assert other.stat().st_size == st_before.st_size
    shutil.copyfile(other, ref)
    os.utime(ref, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))  # what cp -p keeps
    new = adm.evaluate(s, NpzImages(ref), fake_extractor, ref_cache=cache, progress=False)
    fresh = adm.evaluate(s, NpzImages(ref), fake_extractor, progress=False)
    assert new["fid"] != old["fid"] and new["fid"] == fresh["fid"]
    assert adm.evaluate(s, NpzImages(ref), fake_extractor, ref_cache=cache, progress=False)["fid"] == fresh["fid"]


@pytest.fixture(scope="module")
def default_model():
    import ditas

    return ditas.load_dit()


def _interrupted_run(model, out: Path, batch_size: int, monkeypatch):
    from ditas.diffusion import sharded
    from ditas.diffusion.run import SamplingSettings

    with monkeypatch.context() as mp:
        mp.setattr(sharded, "write_npz_stream", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            sharded.sample_npz(model, [1, 2, 3, 4], out, SamplingSettings(steps=2, seed=0), batch_size=batch_size,
                               shard_size=2, progress=False)


def test_resume_with_another_batch_size_is_refused(tmp_path, default_model, monkeypatch):
    from ditas.diffusion import sharded
    from ditas.diffusion.run import SamplingSettings

    out = tmp_path / "run.npz"
    _interrupted_run(default_model, out, 2, monkeypatch)
    with pytest.raises(DitasError, match="differs in batch_size"):
        sharded.sample_npz(default_model, [1, 2, 3, 4], out, SamplingSettings(steps=2, seed=0), batch_size=1,
                           shard_size=2, progress=False)
    assert sharded.sample_npz(default_model, [1, 2, 3, 4], out, SamplingSettings(steps=2, seed=0), batch_size=2,
                              shard_size=2, progress=False) == out


@pytest.mark.parametrize("damage", ["zero-filled", "empty", "no checksum"])
def test_damaged_finished_shard_is_refused(tmp_path, default_model, monkeypatch, damage):
    from ditas.diffusion import sharded
    from ditas.diffusion.run import SamplingSettings

    out = tmp_path / "run.npz"
    _interrupted_run(default_model, out, 2, monkeypatch)
    shard = out.with_name("run.npz.shards") / sharded.shard_name(2, 4)
    if damage == "zero-filled":  # a valid header, the data replaced by zeros
        raw = shard.read_bytes()
        header = len(raw) - 2 * 32 * 32 * 3
        shard.write_bytes(raw[:header] + bytes(len(raw) - header))
        match = "does not match its checksum"
    elif damage == "empty":
        shard.write_bytes(b"")
        match = "no valid .npy header"
    else:
        sharded.checksum_path(shard).unlink()
        match = "no readable checksum"
    with pytest.raises(DitasError, match=match) as exc:
        sharded.sample_npz(default_model, [1, 2, 3, 4], out, SamplingSettings(steps=2, seed=0), batch_size=2,
                           shard_size=2, progress=False)
    assert "\n" not in str(exc.value) and not out.exists()


@pytest.mark.parametrize("content", ["[1, 2]", '{"format": "ditas-sample-shards", "shard_size": 1e400}',
                                     "[" * 100000])
def test_broken_manifest_is_a_one_line_error(tmp_path, default_model, content):
    from ditas.diffusion import sharded
    from ditas.diffusion.run import SamplingSettings

    out = tmp_path / "run.npz"
    shards = out.with_name("run.npz.shards")
    shards.mkdir()
    (shards / "run.json").write_text(content)
    with pytest.raises(DitasError) as exc:
        sharded.sample_npz(default_model, [1, 2], out, SamplingSettings(steps=2, seed=0), progress=False)
    assert "\n" not in str(exc.value)


def test_a_header_cut_by_zeros_is_one_line_not_a_tokenize_error():
    """Found by the shard fuzz test: numpy parses a header whose dict is cut by zero bytes with
    ast, then tokenize, which raises ``tokenize.TokenError`` (not a ValueError)."""
    from ditas.readers import read_npy_header

    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 8, 8, 3), np.uint8))
    raw = bytearray(buf.getvalue())
    cut = raw.find(b"fortran_o") + len("fortran_o")
    raw[cut:cut + 40] = b"\x00" * 40
    with pytest.raises(DitasError, match="no valid .npy header") as exc:
        read_npy_header(io.BytesIO(bytes(raw)), Path("shard.npy"), "shard", "images", len(raw))
    assert "\n" not in str(exc.value)
