"""``capplug serve local | adapters | proxy``: capplug's HTTP servers (``capplug proxy`` too).

Each checks its bind address and key before anything loads, imports the server's extra
(``capplug[serve]``) with a clear error when it is missing, and runs under uvicorn.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from typing import Any

from capplug.cli._common import (
    UsageError,
    add_api_key_option,
    add_bind_options,
    add_device_option,
    add_feedback_options,
    check_feedback_options,
    positive_int,
)
from capplug.models import DEFAULT_CHAT_MODEL, DEFAULT_HYPERNETWORK, DEFAULT_SCORER


def add_parser(sub: Any) -> None:
    """Add this module's commands to the ``capplug`` subparsers."""
    serve = sub.add_parser("serve", help="run capplug's HTTP servers (needs capplug[serve])")
    serve_sub = serve.add_subparsers(title="servers", metavar="SERVER")
    local = serve_sub.add_parser(
        "local",
        help="an OpenAI-compatible chat-completions endpoint over a local model",
        description=(
            "Serve a local chat model at /v1/chat/completions and /v1/models, for the openai SDK, "
            "LangChain's ChatOpenAI and anything else that speaks OpenAI's API: point its base "
            "URL at http://HOST:PORT/v1. One generation runs at a time."
        ),
    )
    local.add_argument(
        "--model",
        default=DEFAULT_CHAT_MODEL,
        metavar="REF",
        help=f"chat model: a folder, a Hugging Face id, or a packaged name (default: {DEFAULT_CHAT_MODEL})",
    )
    local.add_argument(
        "--name", metavar="ID", help="model id the server lists and answers with (default: --model)"
    )
    add_bind_options(local, port=8000)
    add_device_option(local)
    add_api_key_option(local)
    local.set_defaults(run=_run_serve_local)
    _add_serve_adapters_parser(serve_sub)
    _add_proxy_parser(serve_sub)
    serve.set_defaults(run=lambda _args: serve.print_help() or 2)
    _add_proxy_parser(sub)  # `capplug proxy`, the name it had first


def _run_serve_local(args: argparse.Namespace) -> int:
    _check_bind(args)
    # before the model loads, so a missing extra fails at once
    uvicorn, create_app = _server_imports(
        "capplug.serve",
        "create_app",
        "`capplug serve` needs FastAPI and uvicorn: pip install 'capplug[serve]'",
    )
    from capplug.llms import LocalChatModel

    model = LocalChatModel.from_pretrained(args.model, device=args.device)
    name = args.name or args.model
    app = create_app(model, model_name=name, api_key=args.api_key)
    _run_server(uvicorn, app, args, f"serving {name}")
    return 0


def _add_serve_adapters_parser(serve_sub: Any) -> None:
    adapters = serve_sub.add_parser(
        "adapters",
        help="the adapter service: LoRA adapters by instruction, and chat completions with them",
        description=(
            "Serve the adapter store over HTTP: POST /v1/adapters finds (or makes) the adapter "
            "for an instruction, GET/DELETE /v1/adapters/ID and /files/NAME hand them out, and "
            "/v1/chat/completions answers with the base model ('model': BASE), a stored adapter "
            "('model': 'BASE@ID', 'BASE@NAME' or a name alone) or the adapter for an "
            "'instruction' field. New adapters need a "
            "hypernetwork (--hypernet); with --no-hypernet the service answers with the stored "
            "and imported adapters only. One generation runs at a time."
        ),
    )
    adapters.add_argument(
        "--store",
        default=os.environ.get("CAPPLUG_ADAPTER_STORE", "adapters_store"),
        metavar="DIR",
        help="store folder (default: $CAPPLUG_ADAPTER_STORE or adapters_store)",
    )
    adapters.add_argument(
        "--model",
        metavar="REF",
        help=f"the base model: a folder, a Hugging Face id, or a packaged name (default: the "
        f"hypernetwork's, else {DEFAULT_CHAT_MODEL})",
    )
    hypernet = adapters.add_mutually_exclusive_group()
    hypernet.add_argument(
        "--hypernet",
        metavar="REF",
        help=f"hypernetwork folder that makes new adapters (default: the bundled "
        f"{DEFAULT_HYPERNETWORK}, when this install has it)",
    )
    hypernet.add_argument(
        "--no-hypernet",
        action="store_true",
        help="make no new adapters: serve the stored and imported ones (instructions that miss "
        "get a 503)",
    )
    adapters.add_argument(
        "--chroma-url", metavar="URL", help="a shared Chroma server (chroma run) to index in"
    )
    add_bind_options(adapters, port=8788)
    add_api_key_option(adapters)
    adapters.add_argument(
        "--threshold", type=float, default=0.8, help="least similarity of a hit (default: 0.8)"
    )
    adapters.add_argument(
        "--max-adapters", type=int, metavar="N", help="keep at most N adapters in the store (LRU)"
    )
    _add_judging_options(adapters.add_argument_group("judging hits and adapters"))
    adapters.add_argument(
        "--allow-lora-loading",
        action="store_true",
        help="let POST /v1/load_lora_adapter import a peft folder from a path on this server "
        "under a name (as vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING); off by default",
    )
    adapters.add_argument(
        "--max-loaded",
        type=int,
        default=8,
        metavar="N",
        help="adapters attached to the model at once (default: 8)",
    )
    adapters.add_argument(
        "--max-tokens-cap",
        type=int,
        default=512,
        metavar="N",
        help="most tokens per answer, and the default max_tokens (default: 512)",
    )
    add_device_option(adapters)
    adapters.set_defaults(run=_run_serve_adapters)


def _add_judging_options(judging: Any) -> None:
    """`serve adapters`' checks: each cache hit, and each adapter against the base model."""
    judging.add_argument(
        "--check-hits",
        type=float,
        metavar="BAR",
        help="check every hit with the scorer: answer the instruction (and --hit-probe) with the "
        "cached adapter and refuse the hit when the answer scores below BAR in [0, 1]",
    )
    judging.add_argument(
        "--hit-probe", metavar="TEXT", help="input answered after the instruction when checking"
    )
    judging.add_argument(
        "--fallback",
        action="store_true",
        help="the judged fallback: check each instruction's adapter on its first request "
        "against the bare base model (the selector with --scorer judges both answers) and "
        "answer with the base model where the adapter lost; requests may also ask "
        "'fallback': 'best_of'",
    )
    judging.add_argument(
        "--judge-tokens",
        type=int,
        default=64,
        metavar="N",
        help="with --fallback: the longest answer each side gives when judged (default: 64)",
    )
    judging.add_argument(
        "--scorer",
        default=DEFAULT_SCORER,
        metavar="REF",
        help="the scorer that checks hits and judges with --fallback (default: capplug-default)",
    )


def _run_serve_adapters(args: argparse.Namespace) -> int:
    _check_serve_adapters_args(args)
    # before any model loads, so a missing extra fails at once
    uvicorn, create_adapter_app = _server_imports(
        "capplug.serve.adapter_service",
        "create_adapter_app",
        "`capplug serve adapters` needs the serve and adapters extras: "
        "pip install 'capplug[serve,adapters]'",
    )
    from capplug.adapters.runtime import AdapterRuntime
    from capplug.adapters.store import AdapterStore

    generator, version, model = _hypernet_generator(args)
    model = model or DEFAULT_CHAT_MODEL
    runtime = AdapterRuntime.from_pretrained(model, max_loaded=args.max_loaded, device=args.device)
    check, judge = _hit_check_and_judge(args, runtime)
    store = AdapterStore(
        args.store,
        base_model=model,
        chroma_url=args.chroma_url,
        generator=generator,
        hypernetwork_version=version,
        threshold=args.threshold,
        max_adapters=args.max_adapters,
        verify_hit=check,
    )
    app = create_adapter_app(
        store,
        runtime,
        api_key=args.api_key,
        max_tokens_cap=args.max_tokens_cap,
        allow_load_from_path=args.allow_lora_loading,
        judge=judge,
    )
    what = "making new adapters" if generator is not None else "making no new adapters"
    if judge is not None:
        what += f", judged fallback by {judge.name}"
    try:
        _run_server(
            uvicorn,
            app,
            args,
            f"serving {len(store)} adapters for {store.base_model} from {store.root} ({what})",
        )
    finally:
        store.close()
    return 0


def _check_serve_adapters_args(args: argparse.Namespace) -> None:
    """`serve adapters`' numbers and flags checked before anything loads."""
    _check_bind(args)
    if not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold must be between 0 and 1; got {args.threshold}")
    if args.check_hits is not None and not 0.0 <= args.check_hits <= 1.0:
        raise UsageError(f"--check-hits must be between 0 and 1; got {args.check_hits}")
    if args.hit_probe is not None and args.check_hits is None:
        raise UsageError("--hit-probe applies with --check-hits BAR only")
    if args.judge_tokens < 1:
        raise UsageError(f"--judge-tokens must be >= 1; got {args.judge_tokens}")
    for flag, value in (("--max-adapters", args.max_adapters), ("--max-loaded", args.max_loaded)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1; got {value}")


def _hypernet_generator(args: argparse.Namespace) -> tuple[Any, str | None, str | None]:
    """The hypernetwork's ``generate`` (None with --no-hypernet), its version, and the base
    model: --model, else the hypernetwork's (which must agree)."""
    from capplug.adapters.hypernetwork import Hypernetwork
    from capplug.cli.store import hypernetwork_version
    from capplug.errors import ModelNotFoundError
    from capplug.models.adapter_folder import WrongBaseModelError, canonical_model_name

    generator, version, model = None, None, args.model
    if not args.no_hypernet:
        ref = args.hypernet or DEFAULT_HYPERNETWORK
        try:
            hypernet = Hypernetwork.from_pretrained(ref, device=args.device)
        except ModelNotFoundError as exc:
            if args.hypernet is not None:
                raise
            raise UsageError(
                f"no hypernetwork to make new adapters with: the bundled {DEFAULT_HYPERNETWORK} "
                f"is not in this install ({exc}). Pass --hypernet DIR (a trained hypernetwork, "
                f"e.g. from `capplug adapters train-hypernet`) to make adapters from "
                f"instructions, or --no-hypernet to serve the stored and imported adapters "
                f"(by id, or by an instruction similar enough to theirs) without making new ones"
            ) from exc
        base = hypernet.config.base_model
        if model is None:
            model = hypernet.config.base_ref
        elif canonical_model_name(model).casefold() != base.casefold():
            raise WrongBaseModelError(
                f"the hypernetwork {ref} makes adapters for {base}, not for "
                f"{canonical_model_name(model)} (--model); drop --model or pass a hypernetwork "
                f"for that model"
            )
        generator, version = hypernet.generate, hypernetwork_version(hypernet)
    return generator, version, model


def _hit_check_and_judge(args: argparse.Namespace, runtime: Any) -> tuple[Any, Any]:
    """The scorer's hit check (--check-hits) and the judged fallback (--fallback), or None."""
    check, judge = None, None
    if args.check_hits is not None or args.fallback:
        from capplug.scoring import Scorer

        scorer = Scorer.from_pretrained(args.scorer, device=args.device)
        if args.check_hits is not None:
            from capplug.adapters.hit_check import ScorerHitCheck

            check = ScorerHitCheck(runtime, scorer, bar=args.check_hits, probe=args.hit_probe)
        if args.fallback:
            from capplug.adapters.fallback import AdapterJudge
            from capplug.selection import Reranker

            judge = AdapterJudge(runtime, Reranker(scorer), max_new_tokens=args.judge_tokens)
    return check, judge


def _add_proxy_parser(sub: Any) -> None:
    proxy = sub.add_parser(
        "proxy",
        help="an OpenAI-compatible proxy that reranks an upstream's chat completions",
        description=(
            "Serve OpenAI's API at http://HOST:PORT/v1 in front of --upstream: each chat "
            "completion is drawn N times from the upstream and the best candidate, by the "
            "scorer, is returned; every other route passes through untouched. Clients change "
            "only their base URL. The client's Authorization header goes upstream as it is "
            "(or --upstream-api-key replaces it); the proxy's own key, when set, travels in "
            "'X-Capplug-Key: KEY'."
        ),
    )
    proxy.add_argument(
        "--upstream",
        required=True,
        metavar="URL",
        help="the upstream's OpenAI base URL, e.g. https://api.openai.com/v1 or "
        "http://127.0.0.1:8000/v1",
    )
    proxy.add_argument(
        "--n",
        type=int,
        default=8,
        help="candidates per request (default: 8; X-Capplug-N per request)",
    )
    proxy.add_argument(
        "--max-n", type=int, default=32, help="most candidates a request may ask for (default: 32)"
    )
    proxy.add_argument(
        "--scorer",
        default=DEFAULT_SCORER,
        metavar="REF",
        help=f"scorer: a folder, a Hugging Face id, or a packaged name (default: {DEFAULT_SCORER})",
    )
    add_bind_options(proxy, port=8787)
    add_api_key_option(proxy, header="X-Capplug-Key: KEY")
    proxy.add_argument(
        "--upstream-api-key",
        default=os.environ.get("CAPPLUG_UPSTREAM_API_KEY") or None,
        metavar="KEY",
        help="send 'Authorization: Bearer KEY' upstream in place of the client's own "
        "(default: $CAPPLUG_UPSTREAM_API_KEY; unset: the client's header goes upstream)",
    )
    _add_upstream_options(proxy.add_argument_group("the upstream"))
    proxy.add_argument(
        "--no-logprobs",
        dest="request_logprobs",
        action="store_false",
        help="do not ask the upstream for logprobs (by default they are asked for as a "
        "selection signal when the request does not say, and dropped where refused)",
    )
    add_feedback_options(
        proxy,
        recorded="each reranked answer's candidates and choice",
        judged="POST /v1/feedback with its selection_id",
        scored="each request",
    )
    proxy.add_argument(
        "--scoring-threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="threads that score each call's parts, one torch thread each (default: one per CPU "
        "on a machine without a GPU; 1 leaves torch's own thread pool)",
    )
    proxy.set_defaults(run=_run_proxy)


def _add_upstream_options(upstream: Any) -> None:
    """`serve proxy`'s limits on each request and each upstream call."""
    upstream.add_argument(
        "--max-body-bytes",
        type=int,
        default=16 << 20,
        metavar="BYTES",
        help="larger request bodies get a 413 (default: 16 MiB)",
    )
    upstream.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="seconds one upstream attempt may take (default: 120)",
    )
    upstream.add_argument(
        "--max-attempts",
        type=int,
        default=5,
        help="attempts per upstream call, the first included (default: 5)",
    )
    upstream.add_argument(
        "--max-retry-seconds",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="no retry starts that would end later than this after the first attempt (default: 60)",
    )
    upstream.add_argument(
        "--native-n",
        choices=("auto", "never"),
        default="auto",
        help="auto: ask for N choices in one request, fanning out where the upstream ignores "
        "it; never: always N single requests (default: auto)",
    )


def _run_proxy(args: argparse.Namespace) -> int:
    _check_bind(args)
    check_feedback_options(args)
    # before the scorer loads, so a missing extra fails at once
    uvicorn, create_proxy_app = _server_imports(
        "capplug.serve",
        "create_proxy_app",
        "`capplug proxy` needs the serve extra: pip install 'capplug[serve]'",
    )
    from capplug.llms.retry import RetryPolicy

    threads = _scoring_threads(args.scoring_threads)
    # The scorer loads last, once every other option has been checked.
    app = create_proxy_app(
        args.upstream,
        scorer=args.scorer,
        n=args.n,
        max_n=args.max_n,
        retry=RetryPolicy(max_attempts=args.max_attempts, max_total_seconds=args.max_retry_seconds),
        timeout=args.timeout,
        api_key=args.api_key,
        upstream_api_key=args.upstream_api_key,
        max_body_bytes=args.max_body_bytes,
        native_n=args.native_n,
        request_logprobs=args.request_logprobs,
        feedback=args.feedback,
        scoring_threads=threads,
        task_scorers=args.task_scorers,
        auto_adapt=args.auto_adapt,
    )
    # (the upstream URL carries no credentials: create_proxy_app refuses them)
    _run_server(uvicorn, app, args, f"reranking {args.upstream} (best of {args.n})")
    return 0


def _scoring_threads(asked: int | None) -> int:
    """The proxy's scoring threads: ``asked``, else one per usable CPU where there is no GPU.

    More than one sets torch to one thread per scoring thread (this process only scores)."""
    import torch

    from capplug._runtime import usable_cpus

    if asked is None:
        asked = 1 if torch.cuda.is_available() else usable_cpus()
    if asked > 1:
        torch.set_num_threads(1)
    return asked


def _check_bind(args: argparse.Namespace) -> None:
    """A server's --host/--port/--api-key: a valid port, and a key to listen beyond loopback."""
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be between 1 and 65535; got {args.port}")
    if args.api_key is None and not _is_loopback(args.host):
        raise UsageError(
            f"--host {args.host} is reachable from other machines; give --api-key KEY "
            f"(or set CAPPLUG_API_KEY), or bind to 127.0.0.1"
        )


def _server_imports(module: str, factory: str, needs: str) -> tuple[Any, Any]:
    """uvicorn and ``module.factory``, or a usage error: ``needs`` and what is missing."""
    import importlib

    try:
        import uvicorn

        app_factory = getattr(importlib.import_module(module), factory)
    except ImportError as exc:
        missing = exc.__cause__ or exc  # capplug.serve re-raises with the install hint
        raise UsageError(f"{needs} ({missing})") from exc
    return uvicorn, app_factory


def _run_server(uvicorn: Any, app: Any, args: argparse.Namespace, what: str) -> None:
    """Say what is served where (on stderr), then serve ``app`` on --host/--port."""
    print(f"{what} at http://{_url_host(args.host)}:{args.port}/v1 (Ctrl-C stops)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
