"""What a third-party plugin author meets (docs/plugins.md): a misspelt hook stops ``serve`` and the CLI
naming the plugin and the hook; the context sections are the ones registered, nothing hard-coded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pluggy
import pytest

from agentspace import ContextSection, hookimpl
from agentspace.config import Config
from agentspace.plugins import PluginHookError, check_hooks, create_plugin_manager
from agentspace.testing import gateway_client, make_config, plugin_manager
from tests.scale_servers import free_port

MISSPELT = """
from agentspace import hookimpl

@hookimpl
def register_provider(register, config):  # the hook is register_providers
    raise AssertionError("never called")
"""


def installed_package(root: Path, name: str, module_text: str) -> dict[str, str]:
    """A package as pip installs it (module + dist-info with the entry point) on a PYTHONPATH entry; the
    environment that makes a subprocess load it."""
    site = root / "site"
    site.mkdir(parents=True, exist_ok=True)
    module = name.replace("-", "_")
    (site / f"{module}.py").write_text(module_text)
    dist = site / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[agentspace]\n{module} = {module}\n")
    env = {k: v for k, v in os.environ.items() if k != "AGENTSPACE_LOAD_PLUGINS"}
    env["PYTHONPATH"] = str(site)
    return env


MISSPELT_PARAMETER = """
from agentspace import hookimpl

@hookimpl
def register_tools(regster, config):  # the parameter is register
    raise AssertionError("never called")
"""


def test_a_misspelt_hook_parameter_stops_the_start_naming_the_plugin(tmp_path: Path) -> None:
    env = installed_package(tmp_path, "agentspace-typo2", MISSPELT_PARAMETER)
    env["AGENTSPACE_HOME"] = str(tmp_path / "home")
    done = subprocess.run([sys.executable, "-m", "agentspace", "plugins"], env=env, capture_output=True, text=True)
    assert done.returncode == 1, done
    assert "plugin 'agentspace_typo2'" in done.stderr and "regster" in done.stderr
    assert "(the parameters of register_tools are: register, config)" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["plugins"], ["models"]])
def test_a_misspelt_hook_stops_serve_and_the_cli_naming_plugin_and_hook(tmp_path: Path, command: list[str]) -> None:
    env = installed_package(tmp_path, "agentspace-typo", MISSPELT)
    env["AGENTSPACE_HOME"] = str(tmp_path / "home")
    done = subprocess.run(
        [sys.executable, "-m", "agentspace", *command], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done
    assert "plugin 'agentspace_typo' implements unknown hook 'register_provider'" in done.stderr
    assert "did you mean 'register_providers'?" in done.stderr
    assert "Traceback" not in done.stderr


def test_check_hooks_in_the_test_helpers_and_optional_hooks(tmp_path: Path) -> None:
    class Typo:
        @hookimpl
        def server_startp(self, app: Any, config: Config) -> None: ...

    with pytest.raises(pluggy.PluginValidationError, match="unknown hook 'server_startp'"), plugin_manager(Typo()):
        pass

    class Optional:  # a hook of a future agentspace, marked optional: allowed
        @hookimpl(optionalhook=True)
        def a_later_hook(self) -> None: ...

    pm = create_plugin_manager(load_entry_points=False)
    pm.register(Optional())
    check_hooks(pm)
    pm.register(Typo(), name="typo")
    with pytest.raises(PluginHookError, match="plugin 'typo'"):
        check_hooks(pm)


class Notes:
    @hookimpl
    def register_context_sections(self, register: Any, config: Config) -> None:
        register(ContextSection("notes", lambda request: "Remember the milk."))
        register(ContextSection("glossary", lambda request: "LLM: a large language model."))


async def inspected_sections(tmp_path: Path, upstream: Any, *plugins: object) -> tuple[list[str], dict[str, Any]]:
    """One chat turn, then the context of the session's next call (``GET /api/sessions/ID/context``)."""
    config = make_config(tmp_path, providers={"anthropic": {"base_url": upstream.url}})
    async with gateway_client(config, *plugins) as client:
        resp = await client.post(
            "/api/chat",
            json={
                "id": "s1",
                "trigger": "submit-message",
                "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "Hi"}]}],
            },
        )
        await resp.read()
        reply = await (await client.get("/api/sessions/s1/context")).json()
    return [s["name"] for s in reply["sections"]], reply


async def test_inspect_lists_the_sections_that_are_registered(
    tmp_path: Path, fake_anthropic: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-0123456789abcdef")
    names, reply = await inspected_sections(tmp_path / "a", fake_anthropic, Notes())
    assert names == ["system_prompt", "notes", "glossary", "tools", "response_format", "history", "user_message"]
    notes = next(s for s in reply["sections"] if s["name"] == "notes")
    assert notes["byteCount"] == len("Remember the milk.")
    names, _ = await inspected_sections(tmp_path / "b", fake_anthropic)
    assert "memory" not in names and "skills" not in names  # not installed: no rows
    assert names == ["system_prompt", "tools", "response_format", "history", "user_message"]


def test_sections_of_the_installed_memory_and_skills_plugins(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        from agentspace.plugins import create_plugin_manager
        from agentspace.testing import make_config
        import pathlib, sys
        config = make_config(pathlib.Path(sys.argv[1]))
        names = []
        create_plugin_manager().hook.register_context_sections(register=lambda s: names.append(s.name), config=config)
        print(sorted(set(names)))
        """
    )
    env = {**os.environ, "AGENTSPACE_LOAD_PLUGINS": "agentspace-memory,agentspace-skills"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "['memory', 'skills', 'system_prompt']", done.stderr


def test_token_uses_the_data_directory_serve_uses_and_says_which(tmp_path: Path) -> None:
    """``agentspace token`` finds the data directory from AGENTSPACE_CONFIG like ``serve``: its token opens the
    running server; it names the directory on stderr, also when no config was given."""
    import time
    import urllib.error
    import urllib.request

    data, port = tmp_path / "server-data", free_port()
    config = tmp_path / "agentspace.toml"
    config.write_text(f'[storage]\ndata_dir = "{data}"\n[server]\nport = {port}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTSPACE_")}
    env.update(AGENTSPACE_CONFIG=str(config), AGENTSPACE_HOME=str(tmp_path / "home"), AGENTSPACE_LOAD_PLUGINS="")
    server = subprocess.Popen(
        [sys.executable, "-m", "agentspace", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        done = subprocess.run([sys.executable, "-m", "agentspace", "token"], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stderr == f"agentspace: data directory {data} ([storage] data_dir in {config})\n"
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/sessions", headers={"Authorization": f"Bearer {done.stdout.strip()}"}
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:
                    assert resp.status == 200
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(timeout=30)

    del env["AGENTSPACE_CONFIG"]
    done = subprocess.run([sys.executable, "-m", "agentspace", "token"], env=env, capture_output=True, text=True)
    home = tmp_path / "home"
    assert (
        done.stderr == f"agentspace: data directory {home} (AGENTSPACE_HOME; no --config or AGENTSPACE_CONFIG given)\n"
    )
    assert done.stdout.strip() == (home / "gateway-token").read_text().strip()


def test_every_command_reading_the_data_directory_names_it_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal, the commands that read the data directory (usage, sessions, clients, ...) name it on
    stderr; their standard output stays machine-readable (``--json``)."""
    import pty

    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTSPACE_")}
    env.update(AGENTSPACE_HOME=str(data), AGENTSPACE_LOAD_PLUGINS="", LITELLM_LOCAL_MODEL_COST_MAP="True")
    for args in (["usage", "--json"], ["sessions", "list"], ["clients", "list"], ["models", "--json"]):
        master, terminal = pty.openpty()
        try:
            done = subprocess.run(
                [sys.executable, "-m", "agentspace", *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=terminal,
                timeout=120,
            )
            os.close(terminal)
            said = b""
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the terminal's other end is closed: all was read
                    break
                if not chunk:
                    break
                said += chunk
        finally:
            os.close(master)
        assert done.returncode == 0, (args, said)
        assert f"agentspace: data directory {data} (AGENTSPACE_HOME".encode() in said, (args, said)
        assert b"data directory" not in done.stdout, args
        if args[0] == "usage":
            assert "grandTotal" in json.loads(done.stdout)


def test_a_plugin_command_reads_the_data_directory_serve_uses(tmp_path: Path) -> None:
    """The command example of docs/plugins.md (``command_config`` and ``config_options``), installed as a
    package: it writes into the data directory of AGENTSPACE_CONFIG, of a global or its own ``--config``, never
    into AGENTSPACE_HOME while a config names another one."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "plugins.md").read_text(encoding="utf-8")
    [example] = [b for b in doc.split("```python\n") if "def notes_add(" in b]
    env = installed_package(tmp_path, "agentspace-notes-example", example.split("```", 1)[0])
    env = {k: v for k, v in env.items() if not k.startswith("AGENTSPACE_")}
    env.update(AGENTSPACE_HOME=str(tmp_path / "home"), LITELLM_LOCAL_MODEL_COST_MAP="True")
    configs = {}
    for name in ("env", "global", "own"):
        configs[name] = tmp_path / f"{name}.toml"
        configs[name].write_text(f'[storage]\ndata_dir = "{tmp_path / name}"\n')
    runs = {
        "env": (["notes-add", "one"], {"AGENTSPACE_CONFIG": str(configs["env"])}),
        "global": (["--config", str(configs["global"]), "notes-add", "two"], {}),
        "own": (["notes-add", "--config", str(configs["own"]), "three"], {"AGENTSPACE_CONFIG": str(configs["env"])}),
    }
    for name, (args, extra) in runs.items():
        done = subprocess.run(
            [sys.executable, "-m", "agentspace", *args], env={**env, **extra}, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"noted in {tmp_path / name / 'notes.md'}\n"
    assert [(tmp_path / n / "notes.md").read_text() for n in runs] == ["one\n", "two\n", "three\n"]
    assert not (tmp_path / "home" / "notes.md").exists()


def test_two_packages_naming_the_same_plugin_stop_the_start(tmp_path: Path) -> None:
    """pluggy loads one entry point of a name and skips the others without a word: a new plugin named like
    an installed one would do nothing. The start stops instead, naming both packages."""
    site = tmp_path / "site"
    for dist in ("agentspace-twin-a", "agentspace-twin-b"):
        module = dist.replace("-", "_")
        site.mkdir(exist_ok=True)
        (site / f"{module}.py").write_text("")
        info = site / f"{module}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[agentspace]\ntwin = {module}\n")
    env = {k: v for k, v in os.environ.items() if k != "AGENTSPACE_LOAD_PLUGINS"}
    env["PYTHONPATH"] = str(site)
    done = subprocess.run([sys.executable, "-m", "agentspace", "plugins"], env=env, capture_output=True, text=True)
    assert done.returncode == 1
    assert "'agentspace-twin-a' and 'agentspace-twin-b' both name a plugin 'twin'" in done.stderr, done.stderr
    env["AGENTSPACE_LOAD_PLUGINS"] = "echo"  # not selected: no conflict
    done = subprocess.run([sys.executable, "-m", "agentspace", "plugins"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_serve_says_its_data_directory_and_the_token_command_that_finds_it(tmp_path: Path) -> None:
    """``serve --config FILE`` names its data directory and tells the exact ``agentspace token`` to run: run
    from elsewhere, with another AGENTSPACE_HOME, that command prints the token this server accepts."""
    import re
    import shlex
    import urllib.request

    data, port = tmp_path / "server-data", free_port()
    config = tmp_path / "agentspace.toml"
    config.write_text(f'[storage]\ndata_dir = "{data}"\n[server]\nport = {port}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTSPACE_")}
    env.update(AGENTSPACE_HOME=str(tmp_path / "home"), AGENTSPACE_LOAD_PLUGINS="")
    (tmp_path / "home").mkdir()
    server = subprocess.Popen(
        [sys.executable, "-m", "agentspace", "serve", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stderr is not None
        banner = [server.stdout.readline() for _ in range(2)][1]
        said = server.stderr.readline()
        assert said == f"agentspace: data directory {data} ([storage] data_dir in {config})\n"
        command = re.fullmatch(r"Clients need the gateway token: run `(.*)`\.\n", banner)
        assert command is not None, banner
        argv = shlex.split(command.group(1))
        assert argv == ["agentspace", "token", "--config", str(config)]
        done = subprocess.run(
            [sys.executable, "-m", "agentspace", *argv[1:]], env=env, cwd=tmp_path / "home", capture_output=True
        )
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/sessions", headers={"Authorization": f"Bearer {done.stdout.decode().strip()}"}
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
