"""Big models (issue 21): weights read one block at a time, a checkpoint streamed out with a
journal, resume after a kill, and several processes through torch.distributed (gloo on CPU)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import make_tiny_family_model, make_tiny_model
from quantkit import api
from quantkit.checkpoint import write_checkpoint
from quantkit.checkpoint.output import JOURNAL_DIR
from quantkit.distributed import ALONE, Group, assign, from_environment, rows_beat_jobs, spawn
from quantkit.errors import ModelLoadError
from quantkit.formats import FloatSpec, IntSpec
from quantkit.models import load_lazily, load_model
from quantkit.models.lazy import LazyWeights, lazy_model
from quantkit.pipeline import quantize_model
from quantkit.recipe import Recipe, load_recipe

SMALL = dict(num_samples=8, seqlen=64, show_progress=False)


def tensor_digests(folder: Path) -> dict[str, str]:
    """sha256 of every tensor of every safetensors file in `folder`, by name."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k).contiguous()
                out[k] = hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def four_blocks(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("four-blocks"), num_hidden_layers=4, tie=False)


# --------------------------------------------------------------------------- lazy loading

@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "mixtral", "qwen2_moe"])
def test_a_lazy_model_computes_what_the_loaded_one_does(family, tmp_path):
    folder = make_tiny_model(tmp_path / "m") if family == "llama" else make_tiny_family_model(tmp_path / "m", family)
    whole = load_model(str(folder))
    lazy, why = load_lazily(str(folder))
    assert why is None and lazy.weights is not None
    assert all(p.device.type == "meta" for p in lazy.model.parameters())
    for name, _ in list(lazy.model.named_children()):
        lazy.materialize(name)
    ids = torch.randint(0, whole.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(whole.model(ids).logits, lazy.model(ids).logits)


def test_a_block_read_ahead_is_the_block_read_then(four_blocks, tmp_path):
    """prefetch reads a block in a background thread; materialize installs those very tensors, and a
    NaN in a block read ahead is refused when that block is reached, with the same message."""
    direct, _ = load_lazily(str(four_blocks))
    ahead, _ = load_lazily(str(four_blocks))
    ahead.prefetch("model.layers.2")
    assert all(p.device.type == "meta" for p in ahead.model.model.layers[2].parameters())  # nothing installed yet
    got = dict(ahead.materialize("model.layers.2").named_parameters())
    want = dict(direct.materialize("model.layers.2").named_parameters())
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    ahead.prefetch("model.layers.3")
    ahead.release("model.layers.3")  # read ahead, then given back unused: nothing stays
    assert all(p.device.type == "meta" for p in ahead.model.model.layers[3].parameters())

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    bad.mkdir()
    for f in four_blocks.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    state = load_file(bad / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    nan, _ = load_lazily(str(bad))
    nan.prefetch("model.layers.1")
    with pytest.raises(ModelLoadError, match="model.layers.1.mlp.up_proj.weight .*NaN or Inf"):
        nan.materialize("model.layers.1")


def test_lazy_loading_says_why_not(tmp_path, tiny_model_dir):
    from quantkit.models import load_config

    config = load_config(str(tiny_model_dir))
    assert "gguf" in lazy_model(str(tmp_path / "m.gguf"), config)
    (tmp_path / "empty").mkdir()
    assert "no .safetensors" in lazy_model(str(tmp_path / "empty"), config)
    # a tensor under a name the model does not have (as a converted checkpoint would be)
    from safetensors.torch import load_file, save_file

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for f in tiny_model_dir.iterdir():
        (renamed / f.name).write_bytes(f.read_bytes())
    state = load_file(renamed / "model.safetensors")
    state["model.norm.scale"] = state.pop("model.norm.weight")
    save_file(state, renamed / "model.safetensors", metadata={"format": "pt"})
    assert "model.norm.weight" in lazy_model(str(renamed), config)


def test_quantizing_holds_one_block_at_a_time(four_blocks, tmp_path, monkeypatch):
    """Each time a block is read, no other block holds its weights."""
    seen, most = [], [0]
    real_load, real_materialize = api.load_lazily, LazyWeights.materialize

    def load(*args, **kwargs):
        loaded, why = real_load(*args, **kwargs)
        seen.append(loaded)
        return loaded, why

    def materialize(self, module, prefix):
        real_materialize(self, module, prefix)
        held = [b for b in seen[0].model.model.layers if any(p.device.type != "meta" for p in b.parameters())]
        most[0] = max(most[0], len(held))

    monkeypatch.setattr(api, "load_lazily", load)
    monkeypatch.setattr(LazyWeights, "materialize", materialize)
    report = api.quantize(str(four_blocks), "w4a16-gptq", out=tmp_path / "o", **SMALL)
    assert report["weights_loaded"].startswith("lazily") and most[0] == 1
    assert all(p.device.type == "meta" for p in seen[0].model.parameters())  # all given back at the end
    assert [b["block"] for b in report["blocks"]] == [0, 1, 2, 3]
    assert all(b["seconds"] > 0 and b["cpu_rss_bytes"] > 0 for b in report["blocks"])
    assert report["memory"]["peak_cpu_rss_bytes"] > 0 and report["memory"]["peak_gpu_bytes"] is None


# --------------------------------------------------------------------------- the streamed checkpoint

@pytest.mark.parametrize("recipe", ["w4a16-gptq-actorder", "w8a8-fp8-static", "w4a16-awq"])
def test_the_streamed_checkpoint_is_the_one_written_at_the_end(recipe, four_blocks, tmp_path):
    report = api.quantize(str(four_blocks), recipe, out=tmp_path / "streamed", **SMALL)
    loaded = load_model(str(four_blocks))
    r = load_recipe(recipe)
    from quantkit.calibration import calibration_batch, held_out_batch

    c = r.calibration
    r = api.resolve_recipe(r, num_samples=8, seqlen=64)
    ids = calibration_batch(loaded.tokenizer, c.data, 8, 64, c.seed)
    result = quantize_model(loaded, r, ids)
    write_checkpoint(tmp_path / "whole", loaded.model, loaded.tokenizer, result.weights, r.to_yaml(), {},
                     actorder=result.actorder, activations=result.activations, input_scales=result.input_scales)
    assert tensor_digests(tmp_path / "streamed") == tensor_digests(tmp_path / "whole")
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config["quantization_config"] == json.loads((tmp_path / "whole" / "config.json").read_text())["quantization_config"]
    assert not list((tmp_path / "streamed").glob("part-*")) and not (tmp_path / "streamed" / JOURNAL_DIR).exists()
    written = json.loads((tmp_path / "streamed" / "quantization_report.json").read_text())
    assert written["files"] == ["model.safetensors"]
    assert written["bytes_on_disk"] == (tmp_path / "streamed" / "model.safetensors").stat().st_size
    assert report["layers"] == written["layers"]


def test_a_big_checkpoint_is_sharded_one_block_a_file(four_blocks, tmp_path, monkeypatch):
    from quantkit.checkpoint import stream

    monkeypatch.setattr(stream, "ONE_FILE_BYTES", 1024)
    api.quantize(str(four_blocks), "w4a16-rtn", out=tmp_path / "o", **SMALL)
    written = json.loads((tmp_path / "o" / "quantization_report.json").read_text())
    files = written["files"]
    assert written["bytes_on_disk"] == sum((tmp_path / "o" / f).stat().st_size for f in files)
    assert len(files) == 4 + 3 and files[0] == "model-00001-of-00007.safetensors"  # 4 blocks, embed, norm, head
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    reloaded = api.load(tmp_path / "o")
    assert reloaded.model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


# --------------------------------------------------------------------------- resume

def _held_after_block(model: Path, out: Path, block: int, recipe: str = "w4a16-gptq") -> subprocess.Popen:
    """The real CLI in a child process of its own session, stopped (asleep) once block `block`
    is in the journal."""
    script = textwrap.dedent(f"""
        import sys, time
        from quantkit.checkpoint import stream
        real = stream.StreamingCheckpoint.block_done
        def block_done(self, index, *args):  # the journal names a block once its files are written
            real(self, index, *args)
            if self.journal["done"] and self.journal["done"][-1]["block"] == {block}:
                print("DONE", index, flush=True)
                time.sleep(120)
        stream.StreamingCheckpoint.block_done = block_done
        from quantkit.cli import app
        sys.argv = ["quantkit", "quantize", {str(model)!r}, "--recipe", {recipe!r}, "--out", {str(out)!r},
                    "--num-samples", "8", "--seqlen", "64"]
        app()
    """)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_for_block(proc: subprocess.Popen) -> None:
    for line in proc.stdout:
        if line.startswith("DONE"):
            return
    raise AssertionError(f"the run ended before the block was done: {proc.stderr.read()}")


def test_a_run_killed_after_a_block_resumes_to_the_same_checkpoint(four_blocks, tmp_path):
    full = api.quantize(str(four_blocks), "w4a16-gptq", out=tmp_path / "full", **SMALL)
    proc = _held_after_block(four_blocks, tmp_path / "killed", 1)
    try:
        _wait_for_block(proc)
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".killed.tmp-")]
        assert len(partial) == 1 and (partial[0] / JOURNAL_DIR / "journal.json").is_file()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert not (tmp_path / "killed").exists()
    resumed = api.quantize(str(four_blocks), "w4a16-gptq", out=tmp_path / "killed", **SMALL)
    assert resumed["resumed_from"] == 2 and [b["block"] for b in resumed["blocks"]] == [0, 1, 2, 3]
    assert tensor_digests(tmp_path / "killed") == tensor_digests(tmp_path / "full")
    assert resumed["held_out"]["quantized_perplexity"] == full["held_out"]["quantized_perplexity"]
    assert [r["name"] for r in resumed["layers"]] == [r["name"] for r in full["layers"]]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".killed.")]


def test_a_different_recipe_starts_over_and_says_why(four_blocks, tmp_path, caplog):
    proc = _held_after_block(four_blocks, tmp_path / "o", 0)
    try:
        _wait_for_block(proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    with caplog.at_level("WARNING", logger="quantkit"):
        report = api.quantize(str(four_blocks), "w4a16-rtn", out=tmp_path / "o", **SMALL)
    assert report["resumed_from"] is None
    assert any("starting over" in r.getMessage() and "recipe" in r.getMessage() for r in caplog.records)
    assert tensor_digests(tmp_path / "o") == tensor_digests(
        Path(api.quantize(str(four_blocks), "w4a16-rtn", out=tmp_path / "fresh", **SMALL)["out"]))


def test_a_write_that_fails_in_the_writer_thread_fails_the_run_and_leaves_nothing(four_blocks, tmp_path, monkeypatch):
    from quantkit.checkpoint import stream

    real = stream.save_part

    def save_part(state, path):
        if "part-00002" in str(path):
            raise OSError(28, "No space left on device", str(path))
        real(state, path)

    monkeypatch.setattr(stream, "save_part", save_part)
    with pytest.raises(OSError, match="No space left on device"):
        api.quantize(str(four_blocks), "w4a16-rtn", out=tmp_path / "o", **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary folder


def test_sigterm_keeps_the_finished_blocks_for_a_rerun(four_blocks, tmp_path):
    proc = _held_after_block(four_blocks, tmp_path / "o", 2)
    try:
        _wait_for_block(proc)
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr
    assert not (tmp_path / "o").exists() and "run the same command again to resume" in stderr
    resumed = api.quantize(str(four_blocks), "w4a16-gptq", out=tmp_path / "o", **SMALL)
    # block 3 was in the writer's hands when the signal came (the journal named block 2): it is
    # finished and kept too
    assert resumed["resumed_from"] == 4 and [b["block"] for b in resumed["blocks"]] == [0, 1, 2, 3]


# --------------------------------------------------------------------------- several processes

def test_shares_and_assignments():
    assert [Group(r, 3).share(8) for r in range(3)] == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert [Group(r, 4).share(2) for r in range(4)] == [slice(0, 1), slice(1, 2), slice(2, 2), slice(2, 2)]
    assert assign([1.0, 5.0, 3.0, 3.0], 2) == [0, 0, 1, 1]  # 5 + 1 on rank 0, 3 + 3 on rank 1


def test_rows_are_split_where_that_finishes_first():
    # a dense block's stage of one large group: split its rows; eight equal experts on two ranks: whole groups
    assert rows_beat_jobs([(1.0, 10.0)], 2)
    assert not rows_beat_jobs([(1.0, 10.0)] * 8, 2)
    assert rows_beat_jobs([(10.0, 1.0)], 2)  # one job: a half of its rows is never slower
    assert not rows_beat_jobs([(10.0, 1.0)] * 2, 2)  # the factorizations dominate: each rank would repeat both


def _gathered_rows(n):
    comm = from_environment()
    whole = {"bf16": torch.arange(n * 3, dtype=torch.float32).reshape(n, 3).to(torch.bfloat16),
             "f64": torch.linspace(-1, 1, n, dtype=torch.float64),
             "fp8": torch.linspace(-8, 8, n * 2).reshape(n, 2).to(torch.float8_e4m3fn),
             "i8": torch.arange(n * 5, dtype=torch.int8).reshape(n, 5)}
    back = {k: comm.gather_rows(v[comm.share(n)], n) for k, v in whole.items()}
    return {k: bool(back[k].dtype == v.dtype and torch.equal(back[k].view(torch.uint8), v.view(torch.uint8)))
            for k, v in whole.items()}


@pytest.mark.parametrize("n", [7, 1])
def test_rows_gathered_whatever_the_dtype(n):
    """bfloat16 scales, float64 losses, FP8 and int8 values, shares of unequal length (and an empty one)
    come back byte for byte (gloo and NCCL carry neither int16 nor float8: they travel as bytes)."""
    assert spawn(2, _gathered_rows, dict(n=n)) == {"bf16": True, "f64": True, "fp8": True, "i8": True}


GPTQ_SPECS = [IntSpec(4, True, 16), IntSpec(4, False, 16), IntSpec(8, True, None), FloatSpec("channel"), FloatSpec("tensor")]


def _gptq_rows(actorder):
    """GPTQ-round two linears of one input (13 and 6 rows, an odd total) in each spec, with this
    process's share of the rows when in a group."""
    from quantkit.algorithms.gptq import GPTQ, GPTQOptions

    comm = from_environment() or ALONE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 48, generator=g) * torch.linspace(0.2, 3.0, 48)
    weights = [torch.randn(13, 48, generator=g), torch.randn(6, 48, generator=g)]
    out = []
    for spec in GPTQ_SPECS:
        gptq = GPTQ(GPTQOptions(actorder=actorder))
        gptq.observe(("a", "b"), x)
        qws = gptq.round_group(["a", "b"], weights, [spec, spec], share=comm)
        out.append([(qw.q.view(torch.uint8).numpy(), qw.dequantize(torch.float32).numpy(), gptq.report(n)["gptq_loss"])
                    for n, qw in zip("ab", qws)])
    return out  # numpy arrays: tensors would travel back through shared memory that ends with the process


@pytest.mark.parametrize("actorder", [None, "group"])
def test_gptq_rows_split_over_two_processes_give_one_process_solve(actorder):
    alone, two = _gptq_rows(actorder), spawn(2, _gptq_rows, dict(actorder=actorder))
    for spec, a, b in zip(GPTQ_SPECS, alone, two):
        for (qa, wa, la), (qb, wb, lb) in zip(a, b):
            # the same integers; the error feedback on fewer rows rounds in other last bits, which can
            # move a group's scale (computed from its updated columns) by as much
            assert (qa == qb).all(), spec
            assert abs(wa - wb).max() <= 1e-6 * abs(wa).max() and la == pytest.approx(lb, rel=1e-6), spec


STATIC_MSE = Recipe.from_dict({"name": "int8-static-mse", "scheme": "W8A8-INT8", "algorithms": ["rtn"],
                                "activations": {"dynamic": False, "observer": "mse"}})  # histograms summed over ranks


SAMPLED_SQ = Recipe.from_dict({"name": "sq-sampled", "scheme": "W8A8-INT8",  # fewer sample rows than tokens
                                "algorithms": [{"smoothquant": {"alpha": "search", "sample_tokens": 64}}, "rtn"]})


@pytest.mark.parametrize("recipe", ["w4a16-gptq", "w8a8-int8-smoothquant", pytest.param(STATIC_MSE, id="int8-static-mse"),
                                    pytest.param(SAMPLED_SQ, id="smoothquant-sampled")])
def test_two_processes_write_the_checkpoint_one_process_writes(recipe, four_blocks, tmp_path):
    one = api.quantize(str(four_blocks), recipe, out=tmp_path / "one", **SMALL)
    two = api.quantize(str(four_blocks), recipe, out=tmp_path / "two", devices=2, **SMALL)
    assert [p["rank"] for p in two["processes"]] == [0, 1]
    a, b = tensor_digests(tmp_path / "one"), tensor_digests(tmp_path / "two")
    # equal up to the order of float additions in the reduced statistics: on this model, every tensor
    assert a.keys() == b.keys() and sum(a[k] == b[k] for k in a) == len(a)
    assert two["held_out"]["quantized_perplexity"] == pytest.approx(one["held_out"]["quantized_perplexity"], rel=1e-4)


def test_a_failing_rank_is_one_clear_error(tmp_path):
    from quantkit.errors import QuantkitError

    with pytest.raises(QuantkitError, match="model not found"):
        api.quantize(str(tmp_path / "no-such-model"), "w4a16-gptq", out=tmp_path / "o", devices=2, **SMALL)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("family,recipe", [("mixtral", "w4a16-gptq"), ("qwen2_moe", "w8a8-fp8-static")])
def test_two_processes_on_a_mixture_of_experts(family, recipe, tmp_path):
    """Routed counts, observed counts and static input ranges are combined across ranks: the
    experts' fallbacks and scales come out as one process's."""
    folder = make_tiny_family_model(tmp_path / "m", family)
    one = api.quantize(str(folder), recipe, out=tmp_path / "one", **SMALL)
    two = api.quantize(str(folder), recipe, out=tmp_path / "two", devices=2, **SMALL)
    a, b = tensor_digests(tmp_path / "one"), tensor_digests(tmp_path / "two")
    assert a.keys() == b.keys() and sum(a[k] == b[k] for k in a) == len(a)
    routed = lambda report: [(r["name"], r.get("moe_tokens_routed"), r.get("moe_tokens_observed"))  # noqa: E731
                             for r in report["layers"]]
    assert routed(one) == routed(two)


def test_torchrun_joins_its_group(four_blocks, tmp_path):
    """`torchrun -m quantkit.cli quantize ...`: two ranks, rank 0 reports and writes."""
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "quantkit.cli",
                           "quantize", str(four_blocks), "--recipe", "w4a16-gptq", "--out", str(out), "--num-samples", "8",
                           "--seqlen", "64", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert [p["rank"] for p in report["processes"]] == [0, 1]
    # torchrun runs each rank on one thread: the same checkpoint as one process on one thread
    alone = subprocess.run([sys.executable, "-m", "quantkit.cli", "quantize", str(four_blocks), "--recipe", "w4a16-gptq",
                            "--out", str(tmp_path / "one"), "--num-samples", "8", "--seqlen", "64", "--json"],
                           capture_output=True, text=True, timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert tensor_digests(out) == tensor_digests(tmp_path / "one")
    assert report["held_out"] == json.loads(alone.stdout)["held_out"]
