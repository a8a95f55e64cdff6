"""The device check for a GPU machine (issue #19), one prepared script:

    python bench/gpu_check.py            # one CUDA GPU: a Llama-2-7B-shaped model in bfloat16
    python bench/gpu_check.py --tiny     # the same steps on a tiny model on the CPU (CI)
    python bench/gpu_check.py --layers 4 # Llama-2-7B's layer shapes, 4 of its 32 layers

Each score set of a 7B model holds 6.5B float32 scores (26 GB), and the check writes four
(two wanda, wandg, actsvd) beside the 13.5 GB model: about 120 GB of disk. Before it starts,
the check compares that with the free space under --work and refuses with the --layers that
would fit (a 64 GB-disk H200 lent here took --layers 4 after the full model filled its disk).

No download and no network: the model is random-initialised from a Llama-2-7B config (the
shapes are what memory and speed depend on, not the weights), the tokenizer is trained
in-process on the shipped text, and the data are the shipped WikiText-2 (plain text, so the
`datasets` package is not needed) and AdvBench prompts. Every step runs the real `wandacli` in
its own process, as a user would; each prints its wall time and the process's peak GPU memory
beside the figure docs/gpus.md's memory table gives, then the `gpu`-marked tests run.

Steps: wanda (safety- and utility-like data: two halves of the text), wandg and actsvd scoring
on 16 samples of 512 tokens; a wanda set difference and an actsvd rank edit from the store;
eval-attack on 16 prompts with the set difference applied (word salad measured under the dense
model); the stored responses judged again in Llama Guard 3's format by a model of the same
shapes (a judge's throughput per 1,000 responses).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Llama-2-7B's shapes (meta-llama/Llama-2-7b-hf config.json).
LLAMA2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
)
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=1024,
)
# What docs/gpus.md's memory table says each step needs on a 7B model (None: no figure given).
README_GB = {"score wanda": 13.5, "score wandg": 45, "score actsvd": 60}

# Runs a wandacli command in this process and reports its peak GPU memory on the last line of
# stderr, whatever the command's exit.
_RUNNER = """
import json, sys, torch
sys.argv = ["wandacli", *json.loads(sys.argv[1])]
from wandacli.cli.main import main
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code or 0
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print("GPU_PEAK " + str(peak), file=sys.stderr)
sys.exit(code)
"""


def build_model(directory: Path, shapes: dict, dtype: str, device: str, lines: int) -> None:
    """A random Llama of `shapes` with a tokenizer trained on the shipped text, saved."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = (REPO / "wandacli" / "datasets" / "wikitext2_test.txt").read_text(encoding="utf-8")
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    vocab = min(shapes["vocab_size"], 8000)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(text.splitlines()[:lines], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(**shapes, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch_dtype).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def disk_needed(shapes: dict) -> int:
    """Bytes the check writes: the bfloat16 model and four float32 score sets (each one score
    per decoder linear weight), with a tenth more for checkpoints and masks."""
    d, inner, layers = (
        shapes["hidden_size"],
        shapes["intermediate_size"],
        shapes["num_hidden_layers"],
    )
    linear = layers * (4 * d * d + 3 * d * inner)
    model = 2 * (linear + 2 * shapes["vocab_size"] * d)
    return int(1.1 * (model + 4 * 4 * linear))


def run_step(name: str, args: list[str], log: list[dict], *, readme: bool = True) -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps([str(a) for a in args])],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "WANDACLI_QUIET": "1"},
    )
    seconds = time.perf_counter() - started
    peak = 0
    for line in done.stderr.splitlines():
        if line.startswith("GPU_PEAK "):
            peak = int(line.split()[1])
    entry = {
        "step": name,
        "ok": done.returncode == 0,
        "seconds": round(seconds, 1),
        "peak_gpu_gb": round(peak / 1e9, 2),
        "readme_gb": README_GB.get(name) if readme else None,
    }
    if done.returncode != 0:
        entry["error"] = (done.stderr.strip().splitlines() or ["?"])[-2:]
    log.append(entry)
    shown = f"{name:<22} {'ok' if entry['ok'] else 'FAILED':<7} {seconds:7.1f} s   peak GPU {entry['peak_gpu_gb']:6.2f} GB"
    if entry["readme_gb"]:
        shown += f"   (docs/gpus.md: ~{entry['readme_gb']} GB)"
    print(shown, flush=True)
    if not entry["ok"]:
        print("   " + " | ".join(entry["error"]), flush=True)
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (CI)")
    parser.add_argument("--work", type=Path, help="where the model and store go [a temp dir]")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the gpu tests")
    parser.add_argument(
        "--layers", type=int, help="decoder layers of the 7B shapes [32, as Llama-2-7B]"
    )
    options = parser.parse_args()
    if options.tiny:
        shapes, dtype, device, samples, seqlen, prompts, tokens = (
            TINY,
            "float32",
            "cpu",
            4,
            64,
            4,
            8,
        )
    else:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: run with --tiny on a CPU", file=sys.stderr)
            return 2
        shapes, dtype, device, samples, seqlen, prompts, tokens = (
            LLAMA2_7B,
            "bfloat16",
            "cuda",
            16,
            512,
            16,
            64,
        )
    if options.layers is not None:
        if options.layers < 1:
            print("--layers must be at least 1", file=sys.stderr)
            return 2
        shapes = {**shapes, "num_hidden_layers": options.layers}
    work = options.work or Path(tempfile.mkdtemp(prefix="wandacli-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    needed, free = disk_needed(shapes), shutil.disk_usage(work).free
    if needed > free:
        per_layer = disk_needed({**shapes, "num_hidden_layers": 1}) - disk_needed(
            {**shapes, "num_hidden_layers": 0}
        )
        fits = max(0, (free - disk_needed({**shapes, "num_hidden_layers": 0})) // per_layer)
        print(
            f"the check needs about {needed / 1e9:.0f} GB under {work}, {free / 1e9:.0f} GB "
            f"free: run with --layers {fits} or a --work on a larger disk",
            file=sys.stderr,
        )
        return 2
    model, store = work / "model", work / "store"
    log: list[dict] = []
    # docs/gpus.md's figures are for the 7B model: not shown beside the tiny one's.
    step = functools.partial(run_step, log=log, readme=not options.tiny)
    started = time.perf_counter()
    if not (model / "config.json").is_file():
        build_model(model, shapes, dtype, device, lines=2000 if options.tiny else 20000)
    print(f"model built in {time.perf_counter() - started:.0f} s: {model}", flush=True)
    common = [
        "--model",
        model,
        "--store",
        store,
        "--device",
        device,
        "--dtype",
        dtype,
        "--no-progress",
    ]
    data = ["--data", "wikitext", "--nsamples", str(samples), "--seqlen", str(seqlen)]
    step(
        "score wanda",
        ["score", "--method", "wanda", *common, *data, "--name", "safety", "--seed", "0"],
    )
    step(
        "score wanda (2nd)",
        ["score", "--method", "wanda", *common, *data, "--name", "utility", "--seed", "1"],
    )
    step("score wandg", ["score", "--method", "wandg", *common, *data, "--name", "wandg"])
    step("score actsvd", ["score", "--method", "actsvd", *common, *data, "--name", "actsvd"])
    step(
        "prune set difference",
        ["prune", "--store", store, "--scores", "safety", "--utility-scores", "utility",
         "--p", "0.05", "--q", "0.05", "--name", "sd", "--no-progress"])  # fmt: skip
    step(
        "rank edit",
        ["prune", *common, "--scores", "actsvd", "--remove-top-ranks", "10", "--name", "edit"],
    )
    step(
        "eval-attack",
        ["eval-attack", "--model", model, "--device", device, "--dtype", dtype, "--mask", "sd",
         "--store", store, "--prompts", "advbench", "--limit", str(prompts), "--configs",
         "basic,multiple_nosys", "--inst", "--template", "llama2", "--max-new-tokens",
         str(tokens), "--out", work / "results", "--no-progress"])  # fmt: skip
    # A judge's throughput: Llama Guard 3's format on the stored responses, the model under
    # test's shapes standing in for Llama-Guard-3-8B's (Llama-3.1-8B: the same 4096 x 32
    # layers), random weights: its verdicts mean nothing, its time and memory are real.
    judged = step(
        "rejudge (llamaguard)",
        ["eval-attack", "--rejudge", "--out", work / "results", "--judge", f"llamaguard:{model}",
         "--model", model, "--device", device, "--dtype", dtype, "--batch-size", "16",
         "--no-word-salad", "--no-progress"])  # fmt: skip
    responses = sum(
        len(path.read_text().splitlines()) for path in (work / "results").glob("*.jsonl")
    )
    if judged["ok"] and responses:
        print(
            f"judge: {responses} responses in {judged['seconds']:.1f} s, about "
            f"{1000 * judged['seconds'] / responses:.0f} s per 1,000 (model load included)",
            flush=True,
        )
    (work / "gpu_check.json").write_text(json.dumps(log, indent=1))
    print(f"all steps: {time.perf_counter() - started:.0f} s; log: {work / 'gpu_check.json'}")
    failed = [e["step"] for e in log if not e["ok"]]
    if not options.skip_tests and not options.tiny:
        tests = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], cwd=REPO
        )
        failed += ["gpu tests"] if tests.returncode else []
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
