"""`generate(..., cache_implementation="static")`: the Sentence Decoder's steps on fixed-shape row slots, compiled
with torch.compile (Transformers' `compile_config`, on CPU too). Tokens equal the dynamic cache's, for batches,
padded prompts, unfinished prompt sentences, joins and leaves of continuous batching; new prompt lengths and
batch sizes past the first few do not compile again (dynamo's counters)."""

import pytest
import torch
from conftest import left_pad, random_text, tiny_sllm
from torch._dynamo.utils import counters
from transformers import CompileConfig, ContinuousBatchingConfig, GenerationConfig

from modeling_sllm.decoder_steps import StaticDecoderSteps
from modeling_sllm.sentence_loop import SentenceLoop

TEXT = random_text(6, 40, seed=1)


def never_stop(model):
    """The untrained stop head never ends a text: rows run to their budgets."""
    with torch.no_grad():
        model.stop_head.bias.copy_(torch.tensor([50.0, -50.0]))
    return model


def generated(model, rows: list[torch.Tensor], max_new_tokens: int = 30, **kwargs) -> torch.LongTensor:
    ids, mask = left_pad(rows)
    return model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, **kwargs)


def graphs() -> int:
    """Graphs dynamo has compiled so far in this process (since the last reset)."""
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("backbone_name", ["llama", "gpt2", "mistral"])
@pytest.mark.parametrize("overrides", [{"decoder_window": 2}, {"decoder_shares_backbone": True, "decoder_window": 3}])
def test_the_static_cache_writes_the_dynamic_caches_tokens(backbone_name, overrides):
    """Eager on the row slots (disable_compile): greedy and seeded sampling equal the dynamic cache's tokens, a
    batch of padded prompts whose last sentences are unfinished or not, rows starting apart."""
    model = never_stop(tiny_sllm(backbone_name, **overrides))
    rows = [TEXT[0, :7], TEXT[1, :12], TEXT[2, :4], TEXT[3, :20]]
    static = dict(cache_implementation="static", disable_compile=True)
    assert torch.equal(generated(model, rows, **static), generated(model, rows))
    outputs = []
    for extra in (static, {}):
        torch.manual_seed(3)
        outputs.append(generated(model, rows, do_sample=True, top_k=5, **extra))
    assert torch.equal(*outputs)


def test_the_decoder_cache_is_the_static_one(monkeypatch):
    """The loop's decoder steps are the static row slots with cache_implementation="static" (and only then)."""
    kinds = []
    run = SentenceLoop.run
    monkeypatch.setattr(SentenceLoop, "run", lambda loop: kinds.append(type(loop.decoder_steps)) or run(loop))
    model = tiny_sllm()
    generated(model, [TEXT[0, :7]], cache_implementation="static", disable_compile=True)
    generated(model, [TEXT[0, :7]])
    assert kinds[0] is StaticDecoderSteps and kinds[1] is not StaticDecoderSteps


def test_compiled_steps_write_the_eager_tokens_and_compile_once_for_new_prompts_and_batch_sizes():
    torch._dynamo.reset()
    counters.clear()
    model = never_stop(tiny_sllm())
    compiled = dict(cache_implementation="static", compile_config=CompileConfig(dynamic=None))
    warm_up = [[TEXT[0, :7]], [TEXT[0, :5], TEXT[1, :9]], [TEXT[0, :5], TEXT[1, :9], TEXT[2, :13]]]
    later = [[TEXT[3, :21]], [TEXT[4, :3]], [TEXT[0, :6], TEXT[1, :10], TEXT[2, :3], TEXT[3, :30]], list(TEXT[:, :11])]
    for index, rows in enumerate(warm_up + later):
        if index == len(warm_up):
            assert graphs() >= 1
            compiled_before = graphs()
        assert torch.equal(generated(model, rows, **compiled), generated(model, rows)), index
    assert graphs() == compiled_before  # prompt lengths, batch sizes 1 to 6: no new graph


def test_continuous_batching_joins_and_leaves_on_the_compiled_steps():
    """A manager of a model whose generation config asks for the static cache runs every request on the compiled
    steps while requests join and leave (3 rows at most): each equals its own offline generate."""
    model = never_stop(tiny_sllm())
    prompts = [TEXT[i, : 3 + 4 * i].tolist() for i in range(6)]
    limits = [8 + 5 * (i % 3) for i in range(6)]
    expected = [
        generated(model, [torch.tensor(p)], max_new_tokens=n)[0, len(p) :].tolist() for p, n in zip(prompts, limits)
    ]
    model.generation_config.cache_implementation = "static"
    built = []
    init = SentenceLoop.__init__

    def recorded(loop, *args, **kwargs):
        init(loop, *args, **kwargs)
        built.append(type(loop.decoder_steps))

    SentenceLoop.__init__ = recorded
    try:
        manager = model.init_continuous_batching(
            GenerationConfig(do_sample=False, max_new_tokens=20), ContinuousBatchingConfig(max_requests_per_batch=3)
        )
        manager.start()
        ids = [manager.add_request(p, max_new_tokens=n) for p, n in zip(prompts, limits)]
        finished = {}
        while len(finished) < len(ids):
            result = manager.get_result(timeout=60)
            assert result is not None, "a request did not finish within 60 s"
            if result.is_finished():
                finished[result.request_id] = result.generated_tokens
        manager.stop(block=True, timeout=10)
    finally:
        SentenceLoop.__init__ = init
    assert set(built) == {StaticDecoderSteps}
    for request_id, tokens, n in zip(ids, expected, limits):
        assert finished[request_id] == tokens[:n], request_id


def test_what_the_static_cache_cannot_do_is_refused_by_name():
    model = tiny_sllm()
    with pytest.raises(ValueError, match="use_cache=True"):
        generated(model, [TEXT[0, :7]], cache_implementation="static", use_cache=False)
    with pytest.raises(ValueError, match="cache_implementation"):
        generated(model, [TEXT[0, :7]], cache_implementation="offloaded")
