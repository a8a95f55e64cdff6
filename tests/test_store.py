"""The store schema (pinned), validation on read, checksums, locking and temporaries."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from wandacli.config.score import ScoreConfig
from wandacli.config.settings import ModelSpec
from wandacli.core.durable import remove_orphan_temporaries
from wandacli.core.errors import ChecksumError, NonFiniteScoresError, StoreError, StoreLockedError
from wandacli.models.loader import load_model
from wandacli.scoring.run import run_score
from wandacli.store.assemble import to_float16_checked
from wandacli.store.files import ScoreSet, StoredFile
from wandacli.store.lock import writer_lock
from wandacli.store.schema import FORMAT_VERSION, SCORES_FORMAT


@pytest.fixture(scope="module")
def wanda_set(tmp_path_factory, tiny_llama_dir, pairs_csv) -> Path:
    store = tmp_path_factory.mktemp("store")
    config = ScoreConfig(
        method="wanda",
        model=ModelSpec(model=str(tiny_llama_dir), device="cpu"),
        data=str(pairs_csv),
        nsamples=5,
        seed=3,
        seqlen=100,
        store=store,
    )
    return run_score(config, command_line=["wandacli", "score", "--method", "wanda"]).path


def _copy(path: Path, tmp_path: Path) -> Path:
    target = tmp_path / path.name
    target.write_bytes(path.read_bytes())
    return target


class TestSchema:
    """The layout is a public contract (docs/store.md); this pins it."""

    def test_file_layout(self, wanda_set):
        assert wanda_set.name == "wanda-pairs.h5"
        assert wanda_set.parent.name == "scores"
        with h5py.File(wanda_set, "r") as handle:
            assert handle.attrs["format"] == SCORES_FORMAT == "wandacli-scores"
            assert handle.attrs["format_version"] == FORMAT_VERSION == 1
            assert sorted(handle.keys()) == ["0", "1", "stats"]
            assert sorted(handle["0"].keys()) == sorted(
                [
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "self_attn.o_proj",
                    "mlp.gate_proj",
                    "mlp.up_proj",
                    "mlp.down_proj",
                ]
            )
            scores = handle["1/mlp.down_proj"]
            assert scores.shape == (32, 48) and scores.dtype == np.float32
            assert scores.fletcher32 and scores.chunks[1] == 48  # chunked by whole rows
            stats = handle["stats/1/mlp.down_proj"]
            assert stats.shape == (48,) and stats.dtype == np.float32

    def test_meta_round_trips(self, wanda_set, tiny_llama_dir):
        with ScoreSet(wanda_set) as score_set:
            meta = score_set.meta
        assert meta["method"] == "wanda"
        assert meta["model"]["id"] == str(tiny_llama_dir.resolve())
        assert meta["model"]["fingerprint"]["shapes"]["0/mlp.down_proj"] == [32, 48]
        assert (meta["nsamples"], meta["seed"], meta["seqlen"]) == (5, 3, 100)
        assert meta["disentangle"] is True and meta["template"] == "raw"
        assert meta["data"]["name"] == "pairs" and len(meta["data"]["sha256"]) == 64
        assert len(meta["data"]["indices"]) == 5
        assert meta["dtype"] == "float32"
        assert set(meta["versions"]) >= {"wandacli", "torch", "transformers"}
        assert meta["command_line"] == "wandacli score --method wanda"
        assert meta["config"]["nsamples"] == 5
        assert meta["started"] <= meta["finished"]

    def test_stats_are_the_mean_squared_norms(self, wanda_set):
        with ScoreSet(wanda_set) as score_set:
            scores, stats = (
                score_set.read("0/self_attn.q_proj"),
                score_set.stats("0/self_attn.q_proj"),
            )
        loaded = load_model(ModelSpec(model=score_set.meta["model"]["id"], device="cpu"))
        weight = loaded.linear_layers[0].weight_matrix().detach().abs().numpy()
        np.testing.assert_allclose(scores, weight * np.sqrt(stats)[None, :], rtol=1e-6)


class TestValidation:
    def _craft(
        self, tmp_path: Path, build, fmt: str = SCORES_FORMAT, version=FORMAT_VERSION, meta="{}"
    ) -> Path:
        path = tmp_path / "crafted.h5"
        with h5py.File(path, "w") as handle:
            handle.attrs["format"] = fmt
            handle.attrs["format_version"] = version
            handle.attrs["meta"] = meta
            build(handle)
        return path

    def test_not_hdf5(self, tmp_path):
        path = tmp_path / "x.h5"
        path.write_text("hello")
        with pytest.raises(StoreError, match="not an HDF5 file"):
            ScoreSet(path)

    def test_other_format(self, tmp_path):
        path = self._craft(tmp_path, lambda h: None, fmt="something-else")
        with pytest.raises(StoreError, match="not a wandacli score set"):
            ScoreSet(path)

    def test_unknown_version(self, tmp_path):
        path = self._craft(tmp_path, lambda h: None, version=99)
        with pytest.raises(StoreError, match="format_version 99"):
            ScoreSet(path)

    def test_meta_not_json(self, tmp_path):
        path = self._craft(tmp_path, lambda h: None, meta="{not json")
        with pytest.raises(StoreError, match="not JSON"):
            ScoreSet(path)

    def test_oversized_meta(self, tmp_path):
        path = self._craft(tmp_path, lambda h: None, meta=json.dumps({"x": "a" * (2 << 20)}))
        with pytest.raises(StoreError, match="oversized"):
            ScoreSet(path)

    def test_external_link(self, tmp_path):
        path = self._craft(
            tmp_path, lambda h: h.__setitem__("0", h5py.ExternalLink("/etc/passwd", "/x"))
        )
        with pytest.raises(StoreError, match="external link"):
            ScoreSet(path)

    def test_external_storage(self, tmp_path):
        raw = tmp_path / "raw.bin"
        raw.write_bytes(b"\0" * 64)

        def build(handle):
            handle.create_dataset("0/a", shape=(4, 4), dtype="f4", external=[(str(raw), 0, 64)])

        with pytest.raises(StoreError, match="external storage"):
            ScoreSet(self._craft(tmp_path, build))

    def test_virtual_dataset(self, tmp_path):
        source = tmp_path / "source.h5"
        with h5py.File(source, "w") as handle:
            handle["data"] = np.ones((4, 4), "f4")

        def build(handle):
            layout = h5py.VirtualLayout(shape=(4, 4), dtype="f4")
            layout[:] = h5py.VirtualSource(str(source), "data", shape=(4, 4))
            handle.create_group("0").create_virtual_dataset("a", layout)

        with pytest.raises(StoreError, match="virtual dataset"):
            ScoreSet(self._craft(tmp_path, build))

    def test_unknown_filter(self, tmp_path):
        def build(handle):
            handle.create_dataset(
                "0/a",
                data=np.ones((4, 4), "f4"),
                chunks=(2, 4),
                compression=32001,
                allow_unknown_filter=True,
            )

        with pytest.raises(StoreError, match="unknown HDF5 filter 32001"):
            ScoreSet(self._craft(tmp_path, build))

    def test_incomplete_set(self, wanda_set, tmp_path):
        copy = _copy(wanda_set, tmp_path)
        with h5py.File(copy, "a") as handle:
            del handle["1/mlp.up_proj"]
        with pytest.raises(StoreError, match="incomplete: missing layer 1 mlp.up_proj"):
            ScoreSet(copy)

    def test_flipped_byte_is_a_checksum_mismatch(self, wanda_set, tmp_path):
        copy = _copy(wanda_set, tmp_path)
        with h5py.File(copy, "r") as handle:
            offset = handle["0/mlp.down_proj"].id.get_chunk_info(0).byte_offset
        with copy.open("r+b") as raw:
            raw.seek(offset + 17)
            byte = raw.read(1)
            raw.seek(offset + 17)
            raw.write(bytes([byte[0] ^ 0xFF]))
        with ScoreSet(copy) as score_set:
            score_set.read("0/mlp.up_proj")  # other arrays still read
            with pytest.raises(
                ChecksumError, match=rf"checksum mismatch in {copy}:/0/mlp.down_proj$"
            ):
                score_set.read("0/mlp.down_proj")

    def test_nan_in_stored_scores_is_refused(self, wanda_set, tmp_path):
        copy = _copy(wanda_set, tmp_path)
        with h5py.File(copy, "a") as handle:
            data = handle["0/mlp.gate_proj"][()]
            data[0, :3] = np.nan
            del handle["0/mlp.gate_proj"]
            handle.create_dataset("0/mlp.gate_proj", data=data, fletcher32=True)
        with ScoreSet(copy) as score_set, pytest.raises(NonFiniteScoresError, match="3 NaN"):
            score_set.read("0/mlp.gate_proj")

    def test_shapes_against_another_model(self, wanda_set, tiny_llama_3layer_dir):
        other = load_model(ModelSpec(model=str(tiny_llama_3layer_dir), device="cpu"))
        with (
            ScoreSet(wanda_set) as score_set,
            pytest.raises(StoreError, match="stored has 2 layers, model has 3"),
        ):
            score_set.check_model(other.fingerprint, "other")

    def test_mask_file_is_not_a_score_set(self, tmp_path):
        path = self._craft(tmp_path, lambda h: None, fmt="wandacli-mask")
        with pytest.raises(StoreError, match="not a wandacli score set"):
            ScoreSet(path)
        assert StoredFile(path, "wandacli-mask", ("uint8",)).meta == {}


class TestFloat16:
    def test_overflow_is_refused(self):
        with pytest.raises(StoreError, match="exceeds float16's maximum"):
            to_float16_checked(np.array([[1.0, 70000.0]], np.float32), "0/mlp.up_proj")

    def test_in_range_values_convert(self):
        assert to_float16_checked(np.array([[1.5]], np.float32), "0/a").dtype == np.float16


class TestLocking:
    def test_second_writer_of_a_file_is_refused_naming_the_holder(self, tmp_path):
        with writer_lock(tmp_path, "scores/s", "wandacli score --method wanda"):
            with pytest.raises(
                StoreLockedError,
                match=rf"set 's' in store .* pid {os.getpid()} .*wandacli score --method wanda",
            ):
                with writer_lock(tmp_path, "scores/s", "second"):
                    pass
            with writer_lock(tmp_path, "masks/m", "prune"):  # another file: no wait
                pass
        with writer_lock(tmp_path, "scores/s", "after"):  # released
            pass

    def test_dead_writers_temporaries_are_removed_live_ones_kept(self, tmp_path):
        import subprocess
        import sys

        orphan = tmp_path / "scores" / ".x.h5.tmp-999999999"  # no such process
        orphan.parent.mkdir(parents=True)
        orphan.write_bytes(b"half-written")
        alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            live = tmp_path / "masks" / f".m.h5.tmp-{alive.pid}"
            live.parent.mkdir()
            live.write_bytes(b"being written")
            with writer_lock(tmp_path, "scores/x", "test"):
                pass
            assert not orphan.exists()
            assert live.exists()  # another writer's, still at work
        finally:
            alive.kill()
            alive.wait()
        assert remove_orphan_temporaries(tmp_path / "missing") == []

    def test_store_path_that_is_a_file(self, tmp_path):
        path = tmp_path / "file"
        path.write_text("")
        with pytest.raises(StoreError, match="is a file, not a directory"):
            with writer_lock(path, "scores/s"):
                pass
