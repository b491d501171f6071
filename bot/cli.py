"""The `parley` command: a table of verbs -> functions. Each verb's work lives in its module."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from bot.config import Settings, load_settings, parse_adapter_specs
from bot.errors import ParleyError

# Settings a user may type as flags on the chat/serve verbs; None means "not typed".
SETTING_FLAGS = ("model", "device", "dtype", "system_prompt", "max_new_tokens", "max_new_tokens_cap",
                 "max_generation_time_s", "context_window", "max_batch_size", "host", "port", "api_key",
                 "api_keys", "auth", "admins", "insecure_public", "allowed_hosts", "queue_size", "max_request_bytes",
                 "backend", "base_url", "backend_api_key")


def add_setting_flags(parser: argparse.ArgumentParser, *, server: bool = False) -> None:
    parser.set_defaults(setting_flags=True)
    # SUPPRESS: an absent sub-command flag must not overwrite a --config given before the verb.
    parser.add_argument("--config", dest="settings_file", default=argparse.SUPPRESS,
                        help="a TOML settings file (or PARLEY_CONFIG)")
    parser.add_argument("--model", help="smollm2-135m (embedded), a Hugging Face id, a model folder or a .gguf file")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="load a LoRA adapter (repeatable; safetensors only)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--system-prompt", dest="system_prompt")
    parser.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    parser.add_argument("--context-window", dest="context_window", type=int)
    parser.add_argument("--backend", choices=["auto", "transformers", "llama.cpp", "openai"],
                        help="what generates: auto (llama.cpp on a CPU for GGUF models), transformers, llama.cpp, "
                             "or openai (an OpenAI-compatible server at --base-url)")
    parser.add_argument("--base-url", dest="base_url", help="the openai backend's server, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--backend-api-key", dest="backend_api_key",
                        help="bearer key for --base-url (or PARLEY_BACKEND_API_KEY)")
    if server:
        parser.add_argument("--host", help="interface to bind (default 127.0.0.1; 0.0.0.0 makes it public)")
        parser.add_argument("--port", type=int)
        parser.add_argument("--api-key", dest="api_key", help="bearer key required on /v1 (or PARLEY_API_KEY)")
        parser.add_argument("--auth", help="browser logins: user:password, or alice:pw1,bob:pw2")
        parser.add_argument("--api-keys", dest="api_keys", help="one API key per person: alice:KEY1,bob:KEY2")
        parser.add_argument("--admins", help="users who may train and manage adapters (default: the first --auth user)")
        parser.add_argument("--allowed-hosts", dest="allowed_hosts",
                            help="extra Host names to answer to, e.g. a reverse proxy's (comma-separated)")
        parser.add_argument("--insecure-public", dest="insecure_public", action="store_true", default=None,
                            help="allow a public --host without --api-key and --auth")
        parser.add_argument("--max-new-tokens-cap", dest="max_new_tokens_cap", type=int)
        parser.add_argument("--max-generation-time", dest="max_generation_time_s", type=float)
        parser.add_argument("--max-batch-size", dest="max_batch_size", type=int)
        parser.add_argument("--queue-size", dest="queue_size", type=int)


def settings_from_args(args: argparse.Namespace) -> Settings:
    flags: dict[str, Any] = {"home": args.home}
    # Only verbs built with add_setting_flags map their flags onto Settings; plugged verbs (index,
    # finetune, ...) have flags of their own that merely share a name (--model, --config...).
    if getattr(args, "setting_flags", False):
        flags.update({k: getattr(args, k, None) for k in SETTING_FLAGS})
        if getattr(args, "adapter", None):
            flags["adapters"] = parse_adapter_specs(args.adapter)
    return load_settings(flags, config_file=args.settings_file)


def build_assistant_factory(args: argparse.Namespace) -> Callable[[], Any]:
    def build():
        from bot.runtime import build_runtime

        return build_runtime(args.settings).assistant
    return build


def cmd_chat(args: argparse.Namespace) -> int:
    from bot.terminal import run_chat

    return run_chat(args.settings, message=args.message, adapter=args.use_adapter,
                    temperature=args.temperature, seed=args.seed)


def cmd_serve(args: argparse.Namespace) -> int:
    from bot.api import serve

    return serve(args.settings)


def cmd_models(args: argparse.Namespace) -> int:
    from bot.models import resolve_model

    path = resolve_model(args.settings.model, args.settings.home)
    print(path)
    return 0


# Verbs that live in other packages: module -> the add_parser it exposes. Optional parts that
# are not installed are left out of the command list instead of breaking `parley`.
PLUGGED_VERBS = ("retrieval.cli", "finetune.cli", "bot.integrations.slack", "bot.integrations.discord",
                 "bot.space")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description="Parley: a chat assistant you can train.")
    parser.add_argument("--home", type=Path, default=None, help="PARLEY_HOME (default ~/.parley)")
    parser.add_argument("--config", dest="settings_file", default=None,
                        help="a TOML settings file (or PARLEY_CONFIG); give it before the verb")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    chat = verbs.add_parser("chat", help="chat in the terminal")
    add_setting_flags(chat)
    chat.add_argument("--message", "-m", help="send one message, print the reply, exit (reads stdin when '-')")
    chat.add_argument("--use-adapter", default="base", metavar="NAME", help="answer with this adapter")
    chat.add_argument("--temperature", type=float, default=None)
    chat.add_argument("--seed", type=int, default=None)
    chat.set_defaults(func=cmd_chat)

    serve = verbs.add_parser("serve", help="serve the browser chat and the OpenAI-compatible API")
    add_setting_flags(serve, server=True)
    serve.set_defaults(func=cmd_serve)

    models = verbs.add_parser("model", help="convert/resolve the model once and print its folder")
    add_setting_flags(models)
    models.set_defaults(func=cmd_models)

    for module_name in PLUGGED_VERBS:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            logging.getLogger(__name__).debug("verb module %s unavailable: %s", module_name, exc)
            continue
        module.add_parser(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        args.home = (args.home or Path(os.environ.get("PARLEY_HOME") or Path.home() / ".parley")).expanduser()
        # Every verb gets the settings object; plugged verbs may ignore it.
        args.settings = settings_from_args(args)
        args.build_assistant = build_assistant_factory(args)
        return int(args.func(args) or 0)
    except ParleyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except Exception as exc:  # plugged verbs raise their own hierarchies (RetrievalError...)
        if type(exc).__name__.endswith("Error") and type(exc).__module__.split(".")[0] in ("retrieval", "finetune", "bot"):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
