"""Typed settings, filled from CLI flags, then PARLEY_* environment variables, then a TOML file.

Precedence (highest first): a flag the user typed > ``PARLEY_<NAME>`` > the ``--config`` TOML file
> the default below. Every field is documented here; the README's settings table mirrors it.
All problems are reported together in one ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from bot.errors import ConfigError


def default_home() -> Path:
    return Path(os.environ.get("PARLEY_HOME") or Path.home() / ".parley").expanduser()


@dataclass
class Settings:
    """Everything a Parley process needs to know. One object, passed explicitly."""

    home: Path = field(default_factory=default_home)
    """PARLEY_HOME: holds models/, adapters/, indexes/, runs/ and parley.db."""
    model: str = "smollm2-135m"
    """The chat model: `smollm2-135m` (embedded), a Hugging Face id, a local folder or a .gguf file."""
    adapters: dict[str, str] = field(default_factory=dict)
    """LoRA adapters to load at start, NAME -> folder (safetensors only)."""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu` or `cuda`."""
    dtype: str = "auto"
    """`auto` (bfloat16 on CUDA, float32 on CPU), `float32` or `bfloat16`."""
    system_prompt: str = "You are Parley, a helpful assistant. Answer clearly and concisely."
    """The system prompt used when a conversation brings none."""
    max_new_tokens: int = 256
    """Default reply length in tokens when a request does not say."""
    max_new_tokens_cap: int = 2048
    """Server-side cap: larger requests are clamped to it."""
    max_generation_time_s: float = 120.0
    """Server-side cap on one generation's wall time; the reply ends with finish reason `length`."""
    context_window: int = 0
    """Tokens of context; 0 uses the model's own limit (max_position_embeddings)."""
    max_batch_size: int = 16
    """How many concurrent conversations decode together in one batch."""
    host: str = "127.0.0.1"
    """Interface `parley serve` binds; anything public is an explicit choice."""
    port: int = 7860
    """Port of `parley serve`."""
    api_key: str = ""
    """Bearer key required on /v1 when set (PARLEY_API_KEY); it belongs to the first --auth user (an admin)."""
    api_keys: str = ""
    """More API keys, one per person: `alice:KEY1,bob:KEY2`; each person's data is their own."""
    auth: str = ""
    """Logins for the browser UI: `user:password`, or several `alice:pw1,bob:pw2`."""
    admins: str = ""
    """Users who may train, load adapters and manage shared data (default: the first --auth user)."""
    insecure_public: bool = False
    """Allow a public --host without --api-key and --auth (anyone who reaches it can use it)."""
    allowed_hosts: str = ""
    """Extra Host names a loopback server answers to (a reverse proxy's name); others get 400
    (a guard against DNS rebinding). Comma-separated."""
    max_upload_bytes: int = 50_000_000
    """Largest document file accepted by an upload (browser or API)."""
    max_request_bytes: int = 1_000_000
    """Largest accepted HTTP request body."""
    queue_size: int = 64
    """Requests waiting beyond this get a prompt `queue full` error."""
    backend: str = "auto"
    """Which engine generates: `transformers`, `llama.cpp` (GGUF files, fast on a CPU), `openai` (any
    OpenAI-compatible server at --base-url: vLLM, llama-server, TGI, Ollama...) or `auto` (llama.cpp on
    a CPU when the model is a GGUF file or the embedded default and llama-cpp-python is installed;
    transformers otherwise)."""
    base_url: str = ""
    """The OpenAI-compatible API the `openai` backend talks to, e.g. `http://127.0.0.1:8000/v1`."""
    backend_api_key: str = ""
    """Bearer key the `openai` backend sends to --base-url (PARLEY_BACKEND_API_KEY); empty sends none."""

    def __post_init__(self) -> None:
        self.home = Path(self.home).expanduser()
        problems: list[str] = []
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device={self.device!r}: use auto, cpu or cuda")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            problems.append(f"dtype={self.dtype!r}: use auto, float32, bfloat16 or float16")
        for name in ("max_new_tokens", "max_new_tokens_cap", "max_batch_size", "queue_size",
                     "max_request_bytes", "max_upload_bytes"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)!r}: must be at least 1")
        if self.max_generation_time_s <= 0:
            problems.append(f"max_generation_time_s={self.max_generation_time_s!r}: must be > 0")
        if self.context_window < 0:
            problems.append(f"context_window={self.context_window!r}: use 0 (model's own) or more")
        if self.backend not in ("auto", "transformers", "llama.cpp", "openai"):
            problems.append(f"backend={self.backend!r}: use auto, transformers, llama.cpp or openai")
        if self.backend == "openai" and not self.base_url:
            problems.append("backend=openai needs base_url: the server's OpenAI API, e.g. --base-url "
                            "http://127.0.0.1:8000/v1")
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            problems.append(f"base_url={self.base_url!r}: give an http:// or https:// URL, e.g. http://127.0.0.1:8000/v1")
        if not (0 < self.port < 65536):
            problems.append(f"port={self.port!r}: must be between 1 and 65535")
        from bot.owners import Access

        try:
            Access.from_settings(self)
        except ConfigError as exc:
            problems.append(str(exc))
        for name in self.adapters:
            if not name or name == "base" or not name.replace("-", "").replace("_", "").isalnum():
                problems.append(f"adapter name {name!r}: use letters, digits, - and _ (not 'base')")
        if problems:
            raise ConfigError("invalid settings:\n  - " + "\n  - ".join(problems))

    @property
    def db_path(self) -> Path:
        return self.home / "parley.db"


def _coerce(name: str, raw: Any, target: Any, origin: str) -> Any:
    """Turn a string/TOML value into the field's type; explain failures with the origin."""
    kind = target if isinstance(target, type) else type(target)
    try:
        if name == "adapters":
            if isinstance(raw, Mapping):
                return {str(k): str(v) for k, v in raw.items()}
            items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
            return parse_adapter_specs([s for s in items if str(s).strip()])
        if kind is bool:
            return raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes", "on")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is Path or isinstance(target, Path):
            return Path(str(raw))
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}={raw!r} from {origin}: expected {kind.__name__} ({exc})") from None


def parse_adapter_specs(specs: list[str]) -> dict[str, str]:
    """Parse ``NAME=PATH`` items (the --adapter flag). A bare PATH is named after its folder."""
    out: dict[str, str] = {}
    for spec in specs:
        spec = str(spec).strip()
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if not name or not path:
            raise ConfigError(f"--adapter {spec!r}: write it as NAME=PATH")
        out[name.strip()] = path.strip()
    return out


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Settings:
    """Build Settings from (highest first) ``flags``, ``PARLEY_*`` in ``env``, and a TOML file.

    ``flags`` holds only what the user actually typed (None values are ignored). The TOML file may
    use a flat table or sections ([model], [server], [generation]); unknown keys are an error so a
    typo never silently does nothing.
    """
    env = os.environ if env is None else env
    defaults = {f.name: f for f in fields(Settings)}
    template = Settings.__new__(Settings)  # field types without validation
    for f in fields(Settings):
        setattr(template, f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
    values: dict[str, Any] = {}
    problems: list[str] = []

    path = config_file or env.get("PARLEY_CONFIG")
    if path:
        path = Path(path).expanduser()
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist: check the --config path") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict) and key != "adapters":
                flat.update(value)
            else:
                flat[key] = value
        for key, value in flat.items():
            if key not in defaults:
                problems.append(f"{path}: unknown setting {key!r} (known: {', '.join(sorted(defaults))})")
                continue
            try:
                values[key] = _coerce(key, value, getattr(template, key), str(path))
            except ConfigError as exc:
                problems.append(str(exc))

    for key in defaults:
        raw = env.get(f"PARLEY_{key.upper()}")
        if raw is not None and raw != "":
            try:
                values[key] = _coerce(key, raw, getattr(template, key), f"PARLEY_{key.upper()}")
            except ConfigError as exc:
                problems.append(str(exc))

    for key, raw in (flags or {}).items():
        if raw is None:
            continue
        if key not in defaults:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = _coerce(key, raw, getattr(template, key), f"--{key.replace('_', '-')}")

    if problems:
        raise ConfigError("invalid settings:\n  - " + "\n  - ".join(problems))
    return Settings(**values)
