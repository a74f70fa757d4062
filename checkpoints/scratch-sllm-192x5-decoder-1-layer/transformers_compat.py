"""Every private Transformers name the package uses, in one place (the package pins transformers<5.25).

Moving the pin means reading this file: each function wraps one private name (or one undocumented
internal) and says which; the rest of the package calls these functions instead. Checked on 5.24.

Private names the package relies on by overriding or declaring them, which no function can wrap:
- modeling_sllm.py: `PreTrainedModel._initialize_weights(module, is_custom_code)` (overridden to keep
  initialising remote-code modules that hold no weights of their own), `_init_weights`, `_auto_class`,
  and the class attributes `_no_split_modules`, `_supports_sdpa`, `_supports_flash_attn`,
  `_supports_attention_backend`.
- streaming_cache.py: `SinkWindowLayer` subclasses `DynamicLayer` (its `update` concatenates, then the
  layer evicts) and keeps its own `cumulative_length` (the name `CacheLayerMixin.reset` zeroes), and
  builds `Cache(layers=..., layer_class_to_replicate=...)`.
- training.py: `Trainer._prepare_inputs`. Not Transformers: accelerate's `_hf_hook` (sentence_vae.py,
  modeling_sllm.py).
"""

import inspect
from collections.abc import Callable

import torch
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedConfig
from transformers.cache_utils import CacheLayerMixin
from transformers.generation.continuous_batching.requests import GenerationOutput  # not exported

__all__ = ["GenerationOutput"]  # re-exported: continuous_batching.py uses it


def prepare_generation_config(
    model, generation_config: GenerationConfig | None, **kwargs
) -> tuple[GenerationConfig, dict]:
    """`GenerationMixin._prepare_generation_config`: the call's config (the model's, then `generation_config`,
    then the keyword arguments, global defaults filled in) and the keyword arguments it did not take."""
    return model._prepare_generation_config(generation_config, **kwargs)


def special_token_tensors(
    model, config: GenerationConfig, device: torch.device
) -> tuple[torch.LongTensor | None, torch.LongTensor | None]:
    """`GenerationMixin._prepare_special_tokens` and the `_eos_token_tensor` / `_pad_token_tensor` it sets on
    `config`: the eos ids [E] and the pad id (after Transformers' fallbacks), None where unset."""
    model._prepare_special_tokens(config, True, device=device)
    return config._eos_token_tensor, config._pad_token_tensor


def logits_processors(
    model, config: GenerationConfig, prompt_len: int, logits_processor: LogitsProcessorList, device: torch.device
) -> LogitsProcessorList:
    """`GenerationMixin._get_logits_processor`: the processors `config` asks for, merged with the user's."""
    return model._get_logits_processor(
        config, input_ids_seq_length=prompt_len, logits_processor=logits_processor, device=device
    )


def layer_entries(layer: CacheLayerMixin) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A cache layer's stored keys and values [B, heads, T, D], None before its first update
    (`CacheLayerMixin.keys`, `.values`, `.is_initialized`)."""
    return (layer.keys, layer.values) if layer.is_initialized else None


def set_layer_entries(layer: CacheLayerMixin, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Replace a cache layer's stored keys and values [B, heads, T, D] (`CacheLayerMixin.keys`, `.values`)."""
    layer.keys, layer.values = keys, values


def set_seen_entries(layer: CacheLayerMixin, count: int) -> None:
    """Set how many entries a sliding-window layer has seen (`DynamicSlidingWindowLayer.cumulative_length`);
    other layers keep no such count."""
    if hasattr(layer, "cumulative_length"):
        layer.cumulative_length = count


def attn_implementation(config: PreTrainedConfig) -> str | None:
    """The attention implementation a model config selects (`PreTrainedConfig._attn_implementation`)."""
    return config._attn_implementation


def set_attn_implementation(config: PreTrainedConfig, name: str | None) -> None:
    """Select a config's attention implementation (`PreTrainedConfig._attn_implementation`)."""
    config._attn_implementation = name


def keep_custom_generation_fields(generation_config: GenerationConfig) -> None:
    """Mark a generation config as the model's own (`GenerationConfig._from_model_config = False`): loading
    one marked as derived from the model config drops custom fields such as `max_new_sentences`."""
    generation_config._from_model_config = False


def wrap_server_factory(extend: Callable, classes: dict[str, type]) -> None:
    """Prepare `transformers serve` (`transformers.cli.serving`) for a plugin: its model manager finds `classes` by
    name (it looks `config.architectures[0]` up on the `transformers` module, reached only after importing
    `cli.serving.model_manager`), and `extend(app, arguments)` runs on the FastAPI app its `server.build_server`
    returns, with build_server's arguments by name (`model_manager`, `completion_handler`, ...)."""
    import sys

    # the attributes below reach the model manager only when set after it is imported
    import transformers.cli.serving.model_manager  # noqa: F401
    import transformers.cli.serving.server as server

    for name, cls in classes.items():
        setattr(sys.modules["transformers"], name, cls)
    build_server = getattr(server.build_server, "__wrapped__", server.build_server)

    def build_and_extend(*args, **kwargs):
        app = build_server(*args, **kwargs)
        extend(app, inspect.signature(build_server).bind(*args, **kwargs).arguments)
        return app

    build_and_extend.__wrapped__ = build_server
    server.build_server = build_and_extend


def served_model(handler, body: dict) -> tuple[str, object, object]:
    """The model a serving request names (or the one the server is pinned to), loaded: (model id, model, processor)
    (`BaseHandler._resolve_model`, which may rewrite `body`'s "model")."""
    return handler._resolve_model(body)


def set_request_body(request, body: bytes) -> None:
    """Replace the body a Starlette request hands on after `await request.body()` (`Request._body`, which
    BaseHTTPMiddleware replays to the route)."""
    request._body = body


def run_model_threads_with(threads: int) -> None:
    """Have the threads on which `transformers serve` runs models (`cli.serving.utils.InferenceThread._run`, the
    continuous-batching `ContinuousBatchingManager._run_generation_loop`) set their intra-op thread count first."""
    from transformers.cli.serving.utils import InferenceThread
    from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager

    for owner, name in ((InferenceThread, "_run"), (ContinuousBatchingManager, "_run_generation_loop")):
        method = getattr(owner, name)
        method = getattr(method, "__wrapped__", method)

        def with_threads(self, *args, method=method, **kwargs):
            torch.set_num_threads(threads)
            return method(self, *args, **kwargs)

        with_threads.__wrapped__ = method
        setattr(owner, name, with_threads)


def serve_with_grace(grace: float, begin: Callable[[], None]) -> None:
    """At a server's shutdown (SIGTERM), call `begin` first, then bound uvicorn's graceful shutdown
    (`uvicorn.Server.shutdown`; `transformers serve` builds its `uvicorn.Config` without
    `timeout_graceful_shutdown`): connections still open `grace` seconds and a little later are closed."""
    import uvicorn

    shutdown = getattr(uvicorn.Server.shutdown, "__wrapped__", uvicorn.Server.shutdown)

    async def bounded_shutdown(self, *args, **kwargs):
        begin()
        self.config.timeout_graceful_shutdown = grace + 5
        return await shutdown(self, *args, **kwargs)

    bounded_shutdown.__wrapped__ = shutdown
    uvicorn.Server.shutdown = bounded_shutdown


def serve_command() -> Callable[[list[str]], None]:
    """`transformers serve` as a command that takes its arguments (`transformers.cli.serve.Serve`, a typer command)."""
    import typer
    from transformers.cli.serve import Serve

    app = typer.Typer(add_completion=False)
    app.command(help=Serve.__doc__)(Serve)
    command = typer.main.get_command(app)
    return lambda argv: command.main(args=argv, prog_name="sllm-serve")


def load_checkpoint_weights(trainer, checkpoint: str) -> None:
    """Load a Trainer checkpoint's weights into the trainer's model without training (`Trainer._load_from_checkpoint`,
    which handles adapters and sharded files)."""
    trainer._load_from_checkpoint(checkpoint)
