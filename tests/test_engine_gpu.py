"""The engine on a GPU (skipped without one): CUDA-graphed decode gives the same greedy tokens as
transformers' generate in float32, and speculative verification through graphs loses nothing."""

from __future__ import annotations

import pytest
import torch

from conftest import engine_runs, verification_distributions, w8a8_copy
from quantkit.engine.config import EngineConfig
from quantkit.engine.engine import Engine
from quantkit.engine.sequence import SamplingParams
from quantkit.eval.kv_cache import use_fp8_kv_cache
from quantkit.formats import ActSpec, FloatSpec, IntSpec
from quantkit.models.loader import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny_cuda(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    loaded.model.to("cuda")
    return loaded


def _prompts(loaded):
    texts = ["It is a truth universally acknowledged", "The quick brown fox jumps", "Mr. Darcy said"]
    return [loaded.tokenizer(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("graphs,async_decode", [(True, False), (False, False), (True, True)])
def test_graphed_greedy_equals_transformers_generate(tiny_cuda, graphs, async_decode):
    eos = tiny_cuda.model.config.eos_token_id
    prompts = _prompts(tiny_cuda)
    expected = []
    for p in prompts:
        out = tiny_cuda.model.generate(torch.tensor([p], device="cuda"), max_new_tokens=24, do_sample=False,
                                       eos_token_id=eos, pad_token_id=eos)
        expected.append(out[0, len(p):].tolist())
    engine = Engine(tiny_cuda, EngineConfig(cuda_graphs=graphs, block_size=8, async_decode=async_decode))
    seqs = engine.generate(prompts, SamplingParams(max_tokens=24, stop_token_ids=(eos,)))
    assert [s.output_ids for s in seqs] == expected
    assert (engine.stats.pipelined > 0) == async_decode


@pytest.mark.parametrize("mode", ["ngram", "draft"])
def test_graphed_speculative_greedy_equals_plain(tiny_cuda, mode):
    prompts = [p * 2 for p in _prompts(tiny_cuda)]
    params = SamplingParams(max_tokens=32)
    plain = [s.output_ids for s in Engine(tiny_cuda, EngineConfig()).generate(prompts, params)]
    engine = Engine(tiny_cuda, EngineConfig(speculative=mode, num_draft=3),
                    draft=tiny_cuda if mode == "draft" else None)
    assert [s.output_ids for s in engine.generate(prompts, params)] == plain
    assert engine.stats.verify_rows > 0
    if mode == "draft":
        # the model drafting for itself: its proposals are the target's own greedy tokens (up to the
        # rounding of 1- and 4-token forwards). A graphed step's outputs are overwritten by its next
        # replay: the draft must copy its proposals out, or most of them would be rejected.
        assert engine.stats.accepted >= 0.9 * engine.stats.proposed


def test_half_precision_runs_and_batches_agree(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    loaded.model.to("cuda", torch.bfloat16)
    prompts = _prompts(loaded)
    params = SamplingParams(max_tokens=16)
    together = Engine(loaded, EngineConfig()).generate(prompts, params)
    assert all(s.num_output == 16 for s in together)
    # the same prompt alone or beside others: the first token comes from identical prefill math
    alone = Engine(loaded, EngineConfig()).generate(prompts[:1], params)
    assert alone[0].output_ids[0] == together[0].output_ids[0]


def test_fp8_kv_cache_graphed_equals_eager_and_starts_as_transformers(tiny_model_dir):
    # the cache kernels (f16 with an E4M3 cache) in graphs and eagerly give the same tokens, and the
    # first token is transformers' with its keys and values rounded to FP8 as the cache holds them
    loaded = load_model(tiny_model_dir)
    loaded.model.to("cuda", torch.float16)
    prompts = _prompts(loaded)
    params = SamplingParams(max_tokens=16)
    runs = [[s.output_ids for s in Engine(loaded, EngineConfig(cuda_graphs=g, block_size=8, kv_cache_dtype="fp8")
                                         ).generate(prompts, params)] for g in (False, True)]
    assert runs[0] == runs[1]
    use_fp8_kv_cache(loaded.model)
    for p, out in zip(prompts, runs[0]):
        with torch.inference_mode():
            first = int(loaded.model(torch.tensor([p], device="cuda")).logits[0, -1].argmax())
        assert out[0] == first


@pytest.mark.parametrize("graphs", [False, True])
def test_quantized_decode_step_matches_transformers_forward(tiny_model_dir, tmp_path, graphs):
    """A W4A16 checkpoint in float16, batch 1: the decode step (residual add + RMSNorm fused into
    the decode kernel) gives the distribution transformers' forward gives on the same modules."""
    from quantkit.api import load, quantize
    from quantkit.nn.quant_linear import IntWeightLinear

    quantize(str(tiny_model_dir), "w4a16-rtn", tmp_path / "w4", show_progress=False)
    loaded = load(tmp_path / "w4")
    loaded.model.to("cuda", torch.float16)
    assert any(type(m) is IntWeightLinear for m in loaded.model.modules())
    for prompt in _prompts(loaded):
        engine = Engine(loaded, EngineConfig(cuda_graphs=graphs, block_size=8))
        seq = engine.add(prompt, SamplingParams(max_tokens=4))
        engine.step()  # prefill: the prompt's K/V cached, one token sampled
        engine.blocks.append_slots(seq, 1)
        x = engine._inputs([seq], [len(seq) - 1], 1, [[seq.last_token]])
        x.temperature[:] = 1.0
        p, _ = engine.target_step(x, draw=False)
        with torch.no_grad():
            logits = loaded.model(torch.tensor([seq.token_ids], device="cuda")).logits[0, -1].float()
        assert float((p[0, 0] - torch.softmax(logits, -1)).abs().sum()) < 2e-2


@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("graphs", [False, True])
def test_w8a8_inputs_quantized_by_the_op_in_front_change_nothing(tiny_model_dir, monkeypatch, kind, dtype, graphs):
    """W8A8 linears with per-token inputs in 16 bits: the fused kernels (the norm, or SiLU * up,
    writing the quantized input) and the tensor-core matmul on it give the bits of the unfused path
    (the norm's or SiLU's kernel, then the linear's quantize_rows.cu): the same greedy tokens and
    the same logits, through CUDA graphs too."""
    from quantkit.engine import runner
    from quantkit.nn.quant_linear import W8A8Linear

    if kind == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9+")
    spec, act = (FloatSpec("channel"), ActSpec("fp8")) if kind == "fp8" else (IntSpec(8, True, None), ActSpec("int8"))
    loaded = load_model(tiny_model_dir)
    loaded.model.to("cuda", dtype)  # before the copy: .to(dtype) would cast FP8 weights too
    w8a8_copy(loaded, spec, act)
    prompts = _prompts(loaded)
    params, config = SamplingParams(max_tokens=24), EngineConfig(cuda_graphs=graphs, block_size=8)
    fused = engine_runs(loaded, prompts, params, config)
    assert {m.prepared().backend for m in loaded.model.modules() if type(m) is W8A8Linear} == {"torch"}
    monkeypatch.setattr(runner, "_quantized_input", lambda module: None)  # each linear quantizes its input
    plain = engine_runs(loaded, prompts, params, config)
    assert fused[0] == plain[0]
    assert torch.equal(fused[1], plain[1])


# ---- the families beyond Llama on the GPU (the models of test_engine_families) ------------------------
def _family_models():
    from test_engine_families import MODELS

    return list(MODELS)


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    from test_engine_families import make_model

    made = {}

    def get(name):
        if name not in made:
            made[name] = make_model(tmp_path_factory.mktemp(name), name)
        return made[name]
    return get


def _random_prompts(vocab):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (5, 13, 30)]


@pytest.mark.parametrize("name", _family_models())
def test_family_graphed_greedy_equals_transformers_generate(family_dir, name):
    """float32 on the GPU, decode through CUDA graphs: windows, capping, q/k norms and packed
    linears give transformers' greedy tokens."""
    loaded = load_model(family_dir(name))
    loaded.model.to("cuda")
    prompts = _random_prompts(loaded.model.config.vocab_size)
    expected = []
    for p in prompts:
        out = loaded.model.generate(torch.tensor([p], device="cuda"), max_new_tokens=32, do_sample=False,
                                    eos_token_id=None, pad_token_id=loaded.model.config.pad_token_id)
        expected.append(out[0, len(p):].tolist())
    engine = Engine(loaded, EngineConfig(cuda_graphs=True, block_size=4, max_model_len=64))
    seqs = engine.generate(prompts, SamplingParams(max_tokens=32))
    assert [s.output_ids for s in seqs] == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", _family_models())
def test_family_half_precision_step_matches_transformers_forward(family_dir, name, dtype):
    """In 16 bits the fused kernels run (offset norms, q/k norms, gelu-tanh, windowed and capped
    paged attention): prefill then a 3-token verification step gives the distributions of
    transformers' forward in the same dtype, within the rounding of 16-bit arithmetic."""
    loaded = load_model(family_dir(name))
    loaded.model.to("cuda", dtype)
    prompt = _random_prompts(loaded.model.config.vocab_size)[2]  # 30 tokens: past the window of 8
    for graphs in (False, True):
        p, reference = verification_distributions(
            loaded, EngineConfig(cuda_graphs=graphs, block_size=4, max_model_len=64), prompt, "cuda")
        dist = float((p - reference).abs().sum(-1).max())
        print(f"{name} {dtype} graphs={graphs}: L1 distance {dist:.2e}")
        assert dist < (1e-2 if dtype == torch.float16 else 5e-2)  # measured on an H200: 1.5e-3 and 1.5e-2 at most
