"""Calibration data: named sets, local files, sample choice, tokenisation and prompt masking."""

from __future__ import annotations

import hashlib
import json
import random
import re

import pytest
import torch

from wandacli.config.settings import Columns
from wandacli.core.errors import DataError
from wandacli.data.calibration import (
    IGNORE_INDEX,
    build_calibration_set,
    select_rows,
    select_windows,
    strip_llama2_tags,
)
from wandacli.data.sources import NAMED_SETS, load_raw, shipped_data_dir


def _shipped_checksums() -> dict[str, str]:
    """File → sha256 as the shipped folder's README records them."""
    readme = (shipped_data_dir() / "README.md").read_text()
    return dict(
        re.findall(r"^\| `([^`]+)` \| `[^`]+` \|[^|]*\|[^|]*\| `([0-9a-f]{64})`", readme, re.M)
    )


class TestShippedSets:
    """The small sets ship inside the package, so a fresh install needs no network."""

    def test_every_shipped_file_matches_its_recorded_sha256(self, shipped_data):
        recorded = _shipped_checksums()
        shipped = {entry.shipped for entry in NAMED_SETS if entry.shipped}
        assert set(recorded) == shipped
        for name, digest in recorded.items():
            assert hashlib.sha256((shipped_data / name).read_bytes()).hexdigest() == digest, name

    @pytest.mark.parametrize(
        ("name", "purpose", "count"),
        [
            ("align_short", "calibration", 1015),
            ("utility", "calibration", 175),
            ("advbench", "prompts", 520),
            ("jailbreakbench", "prompts", 100),
            ("wikitext", "calibration", 1),
        ],
    )
    def test_named_sets_read_the_shipped_file(self, shipped_data, name, purpose, count):
        raw = load_raw(name, purpose=purpose)
        entry = next(e for e in NAMED_SETS if e.name == name)
        assert raw.source == str(shipped_data / entry.shipped)
        assert raw.content_hash == _shipped_checksums()[entry.shipped]
        assert len(raw.pairs) + len(raw.texts) == count

    def test_the_licence_notices_ship_beside_the_data(self, shipped_data):
        notices = (shipped_data / "LICENSES.md").read_text()
        for holder in (
            "Andy Zou",
            "Boyi Wei",
            "JailbreakBench Team",
            "Apache License",
            "CC BY-SA 3.0",
        ):
            assert holder in notices


class TestResolutionOrder:
    """--data-dir / WANDACLI_DATA_DIR, then the shipped copy, then the public source."""

    def test_a_data_dir_holding_the_set_wins(self, tmp_path, monkeypatch, pairs_csv):
        (tmp_path / "align_short.csv").write_bytes(pairs_csv.read_bytes())
        monkeypatch.setenv("WANDACLI_DATA_DIR", str(tmp_path))
        raw = load_raw("align_short")
        assert raw.source == str(tmp_path / "align_short.csv") and len(raw.pairs) == 12
        assert raw.name == "align_short"

    def test_the_explicit_data_dir_beats_the_environment(self, tmp_path, monkeypatch, pairs_csv):
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "align_short.csv").write_bytes(pairs_csv.read_bytes())
        monkeypatch.setenv("WANDACLI_DATA_DIR", str(tmp_path))
        raw = load_raw("align_short", directory=tmp_path / "mine")
        assert raw.source == str(tmp_path / "mine" / "align_short.csv")

    def test_a_set_missing_from_the_data_dir_falls_back_to_the_shipped_copy(
        self, tmp_path, monkeypatch, shipped_data
    ):
        monkeypatch.setenv("WANDACLI_DATA_DIR", str(tmp_path))
        assert load_raw("align_short").source == str(shipped_data / "align_short.csv")

    def test_a_data_dir_that_does_not_exist_is_an_error(self, tmp_path):
        with pytest.raises(DataError, match="data directory .* does not exist"):
            load_raw("align_short", directory=tmp_path / "nowhere")

    def test_an_unshipped_set_offline_says_how_to_supply_it(self, tmp_path, monkeypatch):
        monkeypatch.setenv("WANDACLI_CACHE_DIR", str(tmp_path / "cache"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(DataError) as caught:
            load_raw("align")
        message = str(caught.value)
        assert "'align' is not shipped" in message and "HF_HUB_OFFLINE" in message
        assert "--data FILE" in message and "--data-dir as align.csv" in message
        assert not (tmp_path / "cache" / "data").exists()

    def test_an_unshipped_set_downloads_once_into_the_cache(self, tmp_path, monkeypatch, pairs_csv):
        """The download path, with urlopen answered locally: the file lands in the cache
        atomically, a second call reads the cache without a request."""
        import io
        import urllib.request

        monkeypatch.setenv("WANDACLI_CACHE_DIR", str(tmp_path / "cache"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        body = pairs_csv.read_bytes()
        requests = []

        class Response(io.BytesIO):
            headers = {"Content-Length": str(len(body))}

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        def fake_urlopen(url, timeout):
            requests.append(url)
            return Response(body)

        monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
        first = load_raw("align")
        second = load_raw("align")
        assert len(requests) == 1 and requests[0].endswith(
            "SFT_aligned_llama2-7b-chat-hf_train.csv"
        )
        cached = tmp_path / "cache" / "data" / "SFT_aligned_llama2-7b-chat-hf_train.csv"
        assert cached.read_bytes() == body
        assert first.pairs == second.pairs and len(first.pairs) == 12
        assert first.content_hash == hashlib.sha256(body).hexdigest()
        assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no temp file left

    def test_a_failed_download_leaves_nothing_and_says_how_to_supply_the_file(
        self, tmp_path, monkeypatch
    ):
        import urllib.error
        import urllib.request

        monkeypatch.setenv("WANDACLI_CACHE_DIR", str(tmp_path / "cache"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

        def no_network(url, timeout):
            raise urllib.error.URLError("Name or service not known")

        monkeypatch.setattr(urllib.request, "urlopen", no_network)
        with pytest.raises(
            DataError, match="cannot download named set 'alpaca_cleaned_no_safety'.*--data FILE"
        ):
            load_raw("alpaca_cleaned_no_safety")
        assert list((tmp_path / "cache" / "data").iterdir()) == []


class TestNamedSets:
    def test_utility_becomes_llama2_pairs(self):
        raw = load_raw("utility")
        assert len(raw.pairs) == 175
        first = raw.pairs[0]
        assert first.prompt.startswith(
            "[INST] Is there anything I can eat"
        ) and first.prompt.endswith(" [/INST]")
        assert first.response.startswith(" Yes, you can have")
        with_input = raw.pairs[1]
        assert "\n\nNight : Day :: Right : Left [/INST]" in with_input.prompt

    def test_wikitext_is_plain_text(self):
        raw = load_raw("wikitext")
        assert raw.kind == "text" and len(raw.texts) == 1 and "Robert Boulter" in raw.texts[0]

    def test_attack_prompts_are_not_calibration_data(self):
        with pytest.raises(DataError, match="not calibration data"):
            load_raw("advbench")

    def test_unknown_set(self):
        with pytest.raises(DataError, match="unknown data set 'nonsense'"):
            load_raw("nonsense")


class TestLocalFiles:
    def test_csv_rows_equal_what_datasets_reads(self, shipped_data):
        """The standard-library CSV reader yields the reference loader's rows."""
        from datasets import load_dataset

        reference = load_dataset(
            "csv", data_files=str(shipped_data / "align_short.csv"), split="train"
        )
        raw = load_raw("align_short")
        assert [p.prompt for p in raw.pairs] == reference["prompt"]
        assert [p.response for p in raw.pairs] == reference["response"]

    def test_json_rows_equal_what_datasets_reads(self, shipped_data):
        from datasets import load_dataset

        from wandacli.data.sources import _load_table

        for name in ("utility_seed_tasks.jsonl", "jailbreakbench.json"):
            reference = load_dataset("json", data_files=str(shipped_data / name), split="train")
            rows = _load_table(shipped_data / name)
            assert rows == [dict(row) for row in reference], name

    def test_csv_pairs(self, pairs_csv):
        raw = load_raw(str(pairs_csv))
        assert raw.name == "pairs" and len(raw.pairs) == 12

    def test_json_jsonl_parquet_and_custom_columns(self, tmp_path):
        rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(3)]
        (tmp_path / "d.json").write_text(json.dumps(rows))
        (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
        for name in ("d.json", "d.jsonl", "d.parquet"):
            raw = load_raw(str(tmp_path / name), columns=Columns(prompt="q", response="a"))
            assert [p.response for p in raw.pairs] == ["answer 0", "answer 1", "answer 2"], name

    def test_text_file(self, tmp_path):
        path = tmp_path / "t.txt"
        path.write_text("some text\nmore text\n")
        raw = load_raw(str(path))
        assert raw.kind == "text" and raw.texts == ["some text\nmore text\n"]

    def test_unknown_column_names_the_columns(self, pairs_csv):
        with pytest.raises(DataError, match=r"columns: prompt, response\).*--prompt-column"):
            load_raw(
                str(pairs_csv), columns=Columns(prompt="question", response="answer", text="body")
            )

    def test_directory_is_an_error(self, tmp_path):
        with pytest.raises(DataError, match="is a directory"):
            load_raw(str(tmp_path))

    def test_empty_file(self, tmp_path):
        path = tmp_path / "empty.csv"
        path.write_text("prompt,response\n")
        with pytest.raises(DataError):
            load_raw(str(path))


class TestSampleChoice:
    @pytest.mark.slow
    def test_rows_match_the_reference_shuffle(self):
        from datasets import Dataset

        dataset = Dataset.from_dict({"i": list(range(50))})
        reference = dataset.shuffle(seed=3).select(range(7))["i"]
        assert select_rows(50, 7, 3) == reference

    def test_windows_match_the_reference_random_calls(self):
        random.seed(5)
        reference = [random.randint(0, 1000 - 64 - 1) for _ in range(4)]
        assert select_windows(1000, 4, 5, 64) == reference

    def test_too_many_samples_is_an_error(self, pairs_csv, tokenizer):
        raw = load_raw(str(pairs_csv))
        with pytest.raises(DataError, match="has only 12 rows"):
            build_calibration_set(raw, tokenizer, nsamples=13, seed=0, seqlen=128)

    def test_deterministic(self, pairs_csv, tokenizer):
        raw = load_raw(str(pairs_csv))
        a = build_calibration_set(raw, tokenizer, nsamples=5, seed=1, seqlen=128)
        b = build_calibration_set(raw, tokenizer, nsamples=5, seed=1, seqlen=128)
        assert a.indices == b.indices
        assert all(
            torch.equal(x.input_ids, y.input_ids) for x, y in zip(a.samples, b.samples, strict=True)
        )


class TestTokenisation:
    def test_disentangled_masks_the_prompt(self, pairs_csv, tokenizer):
        raw = load_raw(str(pairs_csv))
        calibration = build_calibration_set(raw, tokenizer, nsamples=3, seed=0, seqlen=128)
        for index, sample in zip(calibration.indices, calibration.samples, strict=True):
            pair = raw.pairs[index]
            prompt_ids = tokenizer(pair.prompt)["input_ids"]
            response_ids = tokenizer(pair.response, add_special_tokens=False)["input_ids"]
            assert prompt_ids[0] == tokenizer.bos_token_id
            assert sample.input_ids[0].tolist() == prompt_ids + response_ids
            assert (sample.labels[0, : len(prompt_ids)] == IGNORE_INDEX).all()
            assert sample.labels[0, len(prompt_ids) :].tolist() == response_ids
            assert sample.num_counted == len(response_ids)

    def test_no_bos_is_dropped_from_responses(self, pairs_csv, tokenizer):
        # The reference slices off the response's first token, assuming a BOS; we add none.
        raw = load_raw(str(pairs_csv))
        sample = build_calibration_set(raw, tokenizer, nsamples=1, seed=0, seqlen=128).samples[0]
        counted = sample.input_ids[sample.counted]
        assert tokenizer.bos_token_id not in counted.tolist()

    def test_truncation_warns_and_cuts(self, pairs_csv, tokenizer, capsys):
        raw = load_raw(str(pairs_csv))
        calibration = build_calibration_set(raw, tokenizer, nsamples=4, seed=0, seqlen=10)
        assert all(s.input_ids.shape[1] <= 10 for s in calibration.samples)
        assert calibration.truncated == 4

    def test_entangled_windows_count_every_token(self, pairs_csv, tokenizer):
        raw = load_raw(str(pairs_csv))
        calibration = build_calibration_set(
            raw, tokenizer, nsamples=3, seed=0, seqlen=16, disentangle=False
        )
        assert not calibration.disentangle
        for sample in calibration.samples:
            assert sample.input_ids.shape == (1, 16)
            assert sample.num_counted == 16

    def test_text_too_short_for_seqlen(self, tmp_path, tokenizer):
        path = tmp_path / "short.txt"
        path.write_text("tiny")
        with pytest.raises(DataError, match="fewer than --seqlen"):
            build_calibration_set(load_raw(str(path)), tokenizer, nsamples=1, seed=0, seqlen=64)

    def test_chat_template_strips_llama2_tags(self, pairs_csv, tokenizer):
        raw = load_raw(str(pairs_csv))
        calibration = build_calibration_set(
            raw, tokenizer, nsamples=1, seed=0, seqlen=256, template="chat"
        )
        pair = raw.pairs[calibration.indices[0]]
        text = tokenizer.decode(calibration.samples[0].input_ids[0])
        assert "[INST]" not in text
        assert text.startswith("<|user|>" + strip_llama2_tags(pair.prompt)[1])
        assert "<|assistant|>" + pair.response.lstrip() in text

    def test_strip_llama2_tags_keeps_the_system_prompt(self):
        system, user = strip_llama2_tags(
            "[INST] <<SYS>>\nBe nice.\n<</SYS>>\n\nHello there [/INST]"
        )
        assert (system, user) == ("Be nice.", "Hello there")

    def test_chat_template_needs_one(self, pairs_csv):
        from tests.conftest import build_tokenizer

        raw = load_raw(str(pairs_csv))
        with pytest.raises(DataError, match="no chat template"):
            build_calibration_set(
                raw,
                build_tokenizer(with_chat_template=False),
                nsamples=1,
                seed=0,
                seqlen=64,
                template="chat",
            )
