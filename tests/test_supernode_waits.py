"""The SuperNode launcher that shortens Flower's idle waits (fedtune/deploy/supernode_waits.py)."""

from __future__ import annotations

import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from fedtune.deploy import roles
from fedtune.deploy import supernode_waits as waits
from fedtune.deploy.users import flower_program


def test_the_sleeps_of_flowers_loop_are_shortened(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    module = types.ModuleType("fake_loop")
    module.time = time  # type: ignore[attr-defined]
    assert waits.shorten_waits(module)
    module.time.sleep(3)  # type: ignore[attr-defined]
    module.time.sleep(0.5)  # type: ignore[attr-defined]
    assert slept == [waits.IDLE_POLL_SECONDS, waits.LOCAL_WAIT_SECONDS]
    assert module.time.monotonic is time.monotonic  # type: ignore[attr-defined]
    # A module without its own `time` (a Flower this was not written for) is left alone.
    other = types.ModuleType("other")
    assert not waits.shorten_waits(other)
    assert not hasattr(other, "time")


def test_flowers_supernode_module_still_has_the_loop_this_patches() -> None:
    """The installed Flower: its SuperNode loop sleeps 3 s on an empty pull, through `time`."""
    from flwr.supernode import start_client_internal

    source = Path(start_client_internal.__file__).read_text()
    assert "time.sleep(3)" in source
    assert start_client_internal.time is time


def test_the_launcher_is_flowers_script_plus_one_call(tmp_path: Path) -> None:
    program = flower_program()
    launcher = waits.write_launcher(program, tmp_path)
    assert launcher == tmp_path / "flower-supernode"
    text, original = launcher.read_text(), program.read_text()
    assert text.splitlines()[0] == original.splitlines()[0]  # the same Python
    assert "shorten_waits()" in text and text.count("\n") == original.count("\n") + 2
    assert launcher.stat().st_mode & 0o777 == 0o755
    done = subprocess.run(
        [str(launcher), "--help"], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "--superlink" in done.stdout


@pytest.mark.parametrize(
    "script",
    ["not a script\n", "#!/usr/bin/python3\nprint('hello')\n", "\xff\xfe"],
)
def test_an_unknown_script_is_run_as_it_is(tmp_path: Path, script: str) -> None:
    program = tmp_path / "flower-supernode-original"
    program.write_text(script, errors="surrogateescape")
    assert waits.write_launcher(program, tmp_path) is None
    assert not (tmp_path / "flower-supernode").exists()


def test_a_link_in_place_of_the_launcher_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "flower-supernode").symlink_to(victim)
    launcher = waits.write_launcher(flower_program(), tmp_path / "bin")
    assert launcher is not None and not launcher.is_symlink()
    assert victim.read_text() == "keep"


def test_the_supernode_launch_runs_the_given_program_with_a_short_superexec_poll(
    tmp_path: Path,
) -> None:
    for name in ("ca.crt", "key"):
        (tmp_path / name).write_text("x")
    launch = roles.supernode(
        superlink_address="127.0.0.1:9092",
        ca=tmp_path / "ca.crt",
        key=tmp_path / "key",
        port=9094,
        config={"worker": "/x"},
        home=tmp_path / "home",
        program=str(tmp_path / "bin" / "flower-supernode"),
    )
    assert launch.argv[0] == str(tmp_path / "bin" / "flower-supernode")
    assert launch.env[waits.SUPEREXEC_POLL_ENV] == waits.SUPEREXEC_POLL_SECONDS


def test_the_clientapp_entry_skips_the_supernodes_imports() -> None:
    """Flower's own `flwr_clientapp`, imported in a fresh process without the SuperNode."""
    probe = (
        "import sys\n"
        "from fedtune.deploy.supernode_waits import clientapp_entry\n"
        "entry = clientapp_entry()\n"
        "print(entry.__module__, entry.__name__)\n"
        "print('flwr.supernode.cli.flower_supernode' in sys.modules, 'sqlalchemy' in sys.modules)\n"
        "from flwr.supernode.cli import flower_supernode\n"  # its siblings still import
        "print(callable(flower_supernode.flower_supernode))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.split() == [
        "flwr.supernode.cli.flwr_clientapp",
        "flwr_clientapp",
        "False",
        "False",
        "True",
    ]


def test_the_clientapp_launcher_is_flowers_script_with_the_lean_import(tmp_path: Path) -> None:
    program = flower_program("flwr-clientapp")
    launcher = waits.write_clientapp_launcher(program, tmp_path)
    assert launcher == tmp_path / "flwr-clientapp"
    text, original = launcher.read_text(), program.read_text()
    assert text.splitlines()[0] == original.splitlines()[0]
    assert "clientapp_entry()" in text and "from flwr.supernode.cli import" not in text
    assert launcher.stat().st_mode & 0o777 == 0o755
    done = subprocess.run(
        [str(launcher), "--help"], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "--runtime-api-address" in done.stdout
    # Not the script this knows: nothing is written, Flower's own runs.
    other = tmp_path / "other"
    other.write_text("#!/usr/bin/python3\nprint('hello')\n")
    assert waits.write_clientapp_launcher(other, tmp_path / "sub") is None
