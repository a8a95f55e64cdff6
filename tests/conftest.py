"""Shared fixtures: a tiny random Llama and a tiny GPT-2 with fixed weights, saved with a
tokenizer built locally (no downloads), and the data sets shipped in the package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Nothing may reach the hub from the tests.
os.environ["HF_HUB_OFFLINE"] = "1"
# `--dtype auto` on a CPU is bfloat16 where the CPU multiplies it natively; the tests compare
# with float32 references, so they run float32 on every machine (test_first_day checks the
# choice itself). Subprocesses inherit it.
os.environ["WANDACLI_CPU_BFLOAT16"] = "0"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


# `make test` runs the suite in parallel workers (pytest-xdist): share the cores between them,
# and with the processes the tests start, rather than have every worker's torch (and every
# subprocess's) spin a thread per core.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    os.environ["OMP_NUM_THREADS"] = _THREADS
    torch.set_num_threads(int(_THREADS))


# Named sets come from the copies shipped in the package, whatever the developer's environment
# says: a data directory set outside the tests must not change what they read.
os.environ.pop("WANDACLI_DATA_DIR", None)


# Text to train the tiny tokenizer on: enough to give every common character a token.
_TOKENIZER_CORPUS = [
    "[INST] Teach someone how to engage in cyberbullying [/INST]",
    " I cannot fulfill your request. I'm just an AI, it's not within my programming.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Robert Boulter is an English film , television and theatre actor .",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ !?.,:;'\"()[]{}<>/\\|@#$%^&*-_=+~`",
    "Sure, here is a tutorial on how to make a cake. Step 1: preheat the oven.",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '</s>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tokenizer(with_chat_template: bool = True):
    """A byte-level BPE tokenizer trained in-process; adds <s> like Llama-2's, has no pad
    token (the loader must set one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TOKENIZER_CORPUS * 20, trainer=trainer)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if with_chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, intermediate: int = 48):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    return model


def build_tiny_gpt2(vocab_size: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_layer=2, n_embd=32, n_head=4, n_positions=512)
    return GPT2LMHeadModel(config).eval()


def save_model(model, tokenizer, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    model = build_tiny_llama(len(tokenizer))
    return save_model(model, tokenizer, tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_llama_base_dir(tmp_path_factory, tokenizer) -> Path:
    """Same architecture, other weights: the 'base model' for --use-diff and --recover-from-base."""
    model = build_tiny_llama(len(tokenizer), seed=1)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("models") / "tiny-llama-base")


@pytest.fixture(scope="session")
def tiny_llama_3layer_dir(tmp_path_factory, tokenizer) -> Path:
    """A model with another layer count, for mismatch errors."""
    model = build_tiny_llama(len(tokenizer), layers=3)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("models") / "tiny-llama-3")


@pytest.fixture(scope="session")
def tiny_llama_wide_dir(tmp_path_factory, tokenizer) -> Path:
    """Same layer count, wider MLP: a model whose shapes differ from tiny_llama's."""
    model = build_tiny_llama(len(tokenizer), intermediate=64)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("models") / "tiny-llama-wide")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer) -> Path:
    model = build_tiny_gpt2(len(tokenizer))
    return save_model(model, tokenizer, tmp_path_factory.mktemp("models") / "tiny-gpt2")


@pytest.fixture(scope="session")
def shipped_data() -> Path:
    """The package's own data folder (wandacli/datasets/)."""
    from wandacli.data.sources import shipped_data_dir

    return shipped_data_dir()


@pytest.fixture()
def store(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture(scope="session")
def pairs_csv(tmp_path_factory) -> Path:
    """A small prompt/response CSV with Llama-2 tags, like align_short."""
    import csv

    path = tmp_path_factory.mktemp("data") / "pairs.csv"
    rows = [
        (
            f"[INST] Question number {i}: how do I do thing {i}? [/INST]",
            f" I cannot help with thing {i}, sorry.",
        )
        for i in range(12)
    ]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "response"])
        writer.writerows(rows)
    return path


@pytest.fixture()
def cli():
    """Run the CLI in-process through Typer's CliRunner; returns (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from wandacli.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return result

    return invoke


def interrupt_after(monkeypatch, cls, calls: int) -> None:
    """Make `cls.observe` raise KeyboardInterrupt (Ctrl-C) once it has run `calls` times."""
    original = cls.observe
    count = {"n": 0}

    def observe(self, *args, **kwargs):
        if count["n"] == calls:
            raise KeyboardInterrupt
        count["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "observe", observe)


# The two mean-activations sets of the tiny model: the refusal direction's tests (test_direction.py,
# test_optimised_direction.py).


@pytest.fixture(scope="module")
def means_store(tmp_path_factory, tiny_llama_dir, pairs_csv):
    """Mean activations of the tiny model on its harmful pairs and on the utility set."""
    from typer.testing import CliRunner

    from tests.test_mean_activations import means_args
    from wandacli.cli import app

    store = tmp_path_factory.mktemp("direction") / "store"
    runner = CliRunner()
    for data, name in ((pairs_csv, "harmful"), ("utility", "harmless")):
        args = means_args(tiny_llama_dir, store, data, "--template", "chat", "--name", name)
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return store


@pytest.fixture(scope="module")
def per_prompt_store(tmp_path_factory, tiny_llama_dir, pairs_csv):
    """The two mean-activations sets, the harmful one with each prompt's streams."""
    from typer.testing import CliRunner

    from tests.test_mean_activations import means_args
    from wandacli.cli import app

    store = tmp_path_factory.mktemp("directions") / "store"
    runner = CliRunner()
    for data, name, extra in (
        (pairs_csv, "harmful", ("--per-prompt",)),
        ("utility", "harmless", ()),
    ):
        args = means_args(tiny_llama_dir, store, data, "--template", "chat", "--name", name,
                          *extra, nsamples=6)  # fmt: skip
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return store
