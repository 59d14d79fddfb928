"""One definition per option: every config field declares its flag once, every command builds its flags from the
fields, docs/configuration.md is generated from the same parsers, and `disagg.config` imports no torch."""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import subprocess
import sys
import typing
from dataclasses import fields, is_dataclass
from types import ModuleType

import pytest

from disagg import config as cfg
from disagg.config import (
    BatchPolicy,
    GatewayConfig,
    ModelOptions,
    ServerOptions,
    TlsOptions,
    WorkerConfig,
    add_flags,
    flag_env_var,
    from_args,
    option_default,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"
CONFIG_CLASSES = (ModelOptions, BatchPolicy, TlsOptions, ServerOptions, WorkerConfig, GatewayConfig)
# Flags that share a config option's name but are another thing, each declared by its command on purpose.
NOT_THE_OPTION = {
    ("up", "--aggregated"),  # runs aggregated workers (the decode worker's --aggregated is one such worker)
    ("generate", "--seed"),  # the sampling seed of one request, not the seed of dummy weights
    ("bench", "--kv-cache"),  # on / off / both: the clusters to measure
    ("bench", "--local-prefill"),
    ("bench", "--handoff-held-prefix"),
    ("bench", "--greedy-screen"),
    ("bench handoff", "--threads"),  # the threads of the measuring prefill process (default 2)
}


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_disagg_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in [name for name in os.environ if name.startswith("DISAGG_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def commands(no_disagg_env: None) -> dict[str, argparse.ArgumentParser]:
    from disagg.tools.cli import build_parser  # (imports torch)

    return _generator().subcommands(build_parser())


def _parser(cls: type, role: cfg.Role, **kwargs: object) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_flags(parser, cls, role=role, environ={}, **kwargs)
    return parser


def test_the_config_imports_no_torch():
    code = "import sys, disagg.config; assert 'torch' not in sys.modules, 'disagg.config imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_field_is_an_option_with_help():
    for cls in CONFIG_CLASSES:
        nested = [f.name for f in fields(cls) if is_dataclass(typing.get_type_hints(cls)[f.name])]
        options = cfg.option_fields(cls)  # (a field that is neither an option nor a group fails here)
        assert len(options) >= len(fields(cls)) - len(nested)
        for f, _, spec in options:
            assert isinstance(spec, cfg.OptionSpec) and spec.help.strip(), f"{cls.__name__}.{f.name}"


def test_flags_come_from_the_fields_with_each_commands_defaults(no_disagg_env: None):
    prefill = _parser(WorkerConfig, "prefill").parse_args([])
    decode = _parser(WorkerConfig, "decode").parse_args([])
    assert (prefill.max_batch_size, prefill.port) == (16, 50061)
    assert (decode.max_batch_size, decode.port) == (64, 50071)
    assert not hasattr(prefill, "kv_budget_mb") and not hasattr(decode, "kv_wire_dtype")
    config = from_args(WorkerConfig, _parser(WorkerConfig, "decode").parse_args(["--dtype", "bfloat16"]))
    assert config.model.dtype == "bfloat16" and config.batch.max_batch_size == 64 and config.port == 50071
    assert not config.kv_layerwise  # a prefill-only option keeps its field's default
    assert option_default(GatewayConfig, "kv_transport", "up") == "shared-memory"
    assert option_default(GatewayConfig, "kv_transport", "gateway") == "relayed"
    assert option_default(GatewayConfig, "http_port", "up") == cfg.OPENAI_HTTP_PORT
    assert option_default(ModelOptions, "load_format", "bench") == "dummy"
    assert cfg.role_defaults(BatchPolicy, "prefill") == BatchPolicy(max_batch_size=16)
    decode_defaults = cfg.role_defaults(WorkerConfig, "decode")
    assert (decode_defaults.port, decode_defaults.batch, decode_defaults.model) == (
        50071,
        BatchPolicy(),
        ModelOptions(),
    )
    generate = _parser(TlsOptions, "generate").parse_args([])
    assert not hasattr(generate, "tls_require_client_cert")  # a server's setting, not a client's


def test_generate_takes_the_client_side_of_the_tls_and_token_options(commands: dict[str, argparse.ArgumentParser]):
    args = commands["generate"].parse_args(["hi", "--tls-ca", "ca.pem", "--tls-server-name", "gw", "--auth-token", "t"])
    assert from_args(TlsOptions, args) == TlsOptions(tls_ca="ca.pem", tls_server_name="gw") and args.auth_token == "t"
    assert "--tls-require-client-cert" not in commands["generate"]._option_string_actions


def test_only_and_exclude_pick_options_and_refuse_unknown_names():
    up = _parser(GatewayConfig, "up", only=["port", "kv_transport"])
    assert sorted(vars(up.parse_args([]))) == ["kv_transport", "port"]
    no_tls = _parser(GatewayConfig, "gateway", exclude=["tls_cert"])
    assert not hasattr(no_tls.parse_args([]), "tls_cert") and hasattr(no_tls.parse_args([]), "tls_key")
    with pytest.raises(ValueError, match="no options"):
        _parser(GatewayConfig, "gateway", only=["no_such_option"])


def test_the_environment_is_the_fallback_and_the_flag_wins():
    environ = {
        "DISAGG_PORT": "7",
        "DISAGG_KV_CACHE": "false",
        "DISAGG_PREFILL": "a:1, b:2",
        "DISAGG_KV_TRANSPORT": "direct",
        "DISAGG_LOAD_KV_WEIGHT": "2.5",
    }
    parser = argparse.ArgumentParser()
    add_flags(parser, GatewayConfig, role="gateway", environ=environ)
    config = from_args(GatewayConfig, parser.parse_args([]))
    assert (config.port, config.prefill, config.kv_transport, config.load_kv_weight) == (
        7,
        ("a:1", "b:2"),
        "direct",
        2.5,
    )
    assert from_args(GatewayConfig, parser.parse_args(["--port", "9", "--kv-transport", "relayed"])).port == 9
    worker = argparse.ArgumentParser()
    add_flags(worker, WorkerConfig, role="decode", environ=environ)
    assert not from_args(WorkerConfig, worker.parse_args([])).kv_cache
    assert from_args(WorkerConfig, worker.parse_args(["--kv-cache"])).kv_cache
    assert flag_env_var(next(a for a in worker._actions if a.dest == "kv_cache")) == "DISAGG_KV_CACHE"


def test_the_choices_name_what_the_heavy_modules_implement():
    from disagg.kv.codec import WIRE_FORMATS
    from disagg.kv.transports import TRANSPORT_VALUES
    from disagg.model.dtypes import DTYPES
    from disagg.pb.disagg.v1 import worker_pb2

    assert tuple(DTYPES) == cfg.MODEL_DTYPES and (*cfg.MODEL_DTYPES, "int8") == WIRE_FORMATS
    every_transport = {value for _, value in worker_pb2.KvTransport.items() if value != 0}
    assert tuple(TRANSPORT_VALUES) == cfg.KV_TRANSPORTS and set(TRANSPORT_VALUES.values()) == every_transport


def test_no_command_declares_a_config_option_by_hand(commands: dict[str, argparse.ArgumentParser]):
    option_flags = {"--" + f.name.replace("_", "-") for cls in CONFIG_CLASSES for f, _, _ in cfg.option_fields(cls)}
    by_hand = [
        (name, action.option_strings[0])
        for name, parser in commands.items()
        for action in parser._actions
        if action.option_strings and action.option_strings[0] in option_flags and flag_env_var(action) is None
    ]
    assert sorted(set(by_hand) - NOT_THE_OPTION) == []


def test_the_configuration_page_is_generated_from_the_code(tmp_path: pathlib.Path):
    out = tmp_path / "configuration.md"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_config_docs.py"), "--out", str(out)], check=True)
    assert out.read_text() == PAGE.read_text(), "docs/configuration.md is stale: run python scripts/gen_config_docs.py"


def test_every_flag_of_every_command_has_help_and_its_row_on_the_page(commands: dict[str, argparse.ArgumentParser]):
    generator = _generator()
    sections = PAGE.read_text().split("\n## `disagg ")
    pages = {section.split("`", 1)[0]: section for section in sections[1:]}
    assert set(pages) == set(commands)
    for name, parser in commands.items():
        for action in generator.documented(parser):
            where = f"disagg {name} {action.option_strings or action.dest}"
            assert (action.help or "").strip(), f"{where} has no help"
            assert generator.row(action) in pages[name].splitlines(), f"{where}: its row differs on the page"
            for flag in action.option_strings:
                assert f"`{flag}`" in pages[name]
