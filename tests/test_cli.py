from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from fedmem.cli import main
from strategies import STRATEGIES
from tests.conftest import TINY


def test_strategies_lists_every_registered_strategy() -> None:
    result = CliRunner().invoke(main, ["strategies"])
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert [line.split()[0] for line in lines] == STRATEGIES.names()


def test_bad_key_is_one_sentence_and_no_run_directory(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", "--out", str(tmp_path / "runs"), "--set", "strategy.lrr=0.1"])
    assert result.exit_code == 2
    assert "error: unknown config key 'strategy.lrr'; valid keys here:" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_run_then_show_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    args = ["run", "default", "--engine", "inprocess", "--out", str(out)]
    for item in TINY:
        args += ["--set", item]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (run_dir,) = out.iterdir()
    assert "kNN-Per" in result.output and "fine-tuned" in result.output and str(run_dir) in result.output
    shown = CliRunner().invoke(main, ["show", str(run_dir)])
    assert shown.exit_code == 0
    assert "kNN-Per" in shown.output and "unseen" in shown.output


def test_show_refuses_an_incomplete_run(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text('{"status": "failed", "error": "boom"}')
    result = CliRunner().invoke(main, ["show", str(tmp_path)])
    assert result.exit_code == 2
    assert "did not complete" in result.output and "boom" in result.output
    result = CliRunner().invoke(main, ["show", str(tmp_path / "..")])
    assert "not a fedmem run directory" in result.output


def test_compare_then_report_from_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    args = ["compare", "default", "--strategies", "fedavg", "--seeds", "0,1", "--engine", "inprocess"]
    args += ["--out", str(out)]
    for item in TINY:
        args += ["--set", item]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (sweep,) = out.iterdir()
    assert {"sweep.toml", "results.csv", "per_client.csv", "report.md", "fedavg-s0", "fedavg-s1"} <= {
        p.name for p in sweep.iterdir()
    }
    assert "kNN-Per" in result.output and "±" in result.output and str(sweep) in result.output
    again = CliRunner().invoke(main, ["report", str(sweep)])
    assert again.exit_code == 0 and "plots/accuracy_vs_round.png" in again.output
    bad = CliRunner().invoke(main, ["compare", "--seeds", "0,x", "--out", str(out)])
    assert bad.exit_code == 2 and "error: --seeds expects a comma-separated list" in bad.output


def test_damaged_run_files_are_one_sentence_under_show_and_report(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text('{"status": "complete"}')
    (run / "summary.json").write_text("{bad")
    result = CliRunner().invoke(main, ["show", str(run)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.strip() == (
        f"error: {run / 'summary.json'} is damaged (not a JSON object); the run directory was changed "
        "after fedmem wrote it: re-run the scenario or restore the file."
    )
    (run / "status.json").write_text("[]")
    assert "status.json is damaged" in CliRunner().invoke(main, ["show", str(run)]).output

    from fedmem.errors import FedmemError
    from fedmem.results import RunDir

    (run / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2, "tr')
    with pytest.raises(FedmemError, match=r"metrics.jsonl line 2 is not JSON"):
        RunDir(run).metrics()


def test_a_metrics_line_cut_by_a_full_disk_is_taken_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    from fedmem.errors import FedmemError
    from fedmem.results import RunDir

    run = RunDir(tmp_path)
    run.append_metrics({"round": 1})
    before = run.metrics_path.read_bytes()
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        if len(data) > 4:
            return real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(FedmemError, match=r"cannot write .*metrics.jsonl \(No space left on device\)"):
        run.append_metrics({"round": 2, "train_loss": 1.25})
    monkeypatch.setattr(os, "write", real_write)
    assert run.metrics_path.read_bytes() == before and run.metrics() == [{"round": 1}]


def _unwritable_outputs(tmp_path: Path) -> list[tuple[Path, str]]:
    """Output directories this machine's root user cannot write, with what the message must blame."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cases = [
        (blocker / "runs", f"{blocker} is not a directory"),
        (blocker, f"{blocker} is not a directory"),
    ]
    if Path("/proc/self").is_dir():  # procfs takes no new entries, whatever the user's rights
        refused = "/proc does not accept new files (No such file or directory)"
        cases.append((Path("/proc/fedmem-runs"), refused))
    return cases


@pytest.mark.parametrize("command", [["run"], ["compare", "--strategies", "fedavg"], ["audit"]])
def test_an_output_directory_that_cannot_be_written_is_one_sentence(
    tmp_path: Path, command: list[str]
) -> None:
    cases = _unwritable_outputs(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    for out, blamed in cases:
        for how in (["--out", str(out)], ["--set", f"runtime.output_dir={str(out)!r}"]):
            result = CliRunner().invoke(main, [*command, "--engine", "inprocess", *how])
            assert result.exit_code == 2, result.output
            if how[0] == "--out" and out.is_file():  # click's own check of the option comes first
                assert result.output.endswith(f"Invalid value for '--out': Directory '{out}' is a file.\n")
                continue
            assert result.output == (
                f"error: runtime.output_dir = {str(out)!r} cannot be written: {blamed}; pass a writable "
                "directory with --out\n"
            )
    assert sorted(tmp_path.rglob("*")) == before  # nothing created, not even a probe


def test_resuming_into_a_directory_that_cannot_be_written_names_resume() -> None:
    if not Path("/proc/self").is_dir():
        pytest.skip("needs procfs, a directory that takes no new entries")
    result = CliRunner().invoke(main, ["audit", "--engine", "inprocess", "--resume", "/proc"])
    assert result.exit_code == 2
    assert result.output.startswith("error: --resume '/proc' cannot be written: /proc does not accept")
    assert "Traceback" not in result.output


def test_run_directories_under_a_file_are_one_sentence_naming_the_output_dir(tmp_path: Path) -> None:
    from fedmem.errors import FedmemError
    from fedmem.results import RunDir, stamped_dir

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(FedmemError, match=r"^cannot create .*a-file/runs/x-\d.* runtime.output_dir must be"):
        stamped_dir(blocker / "runs", "x")
    with pytest.raises(FedmemError, match=r"^cannot create .*a-file/x-\d.* runtime.output_dir must be"):
        RunDir.create(blocker, "x", "")
    with pytest.raises(FedmemError, match=r"^cannot create .*a-file/fed \(.*\); its parent"):
        RunDir.create_at(blocker / "fed", "")
    first, second = stamped_dir(tmp_path / "runs", "x"), stamped_dir(tmp_path / "runs", "x")
    assert first != second and first.is_dir() and second.is_dir()
