"""make demo: the commands it runs, their order, and that a failing step stops it."""
from __future__ import annotations

from pathlib import Path

import bids_uad.cli.demo as demo
from bids_uad.cli.parser import build_parser


def test_demo_commands_are_valid_bids_uad_command_lines(tmp_path):
    commands = demo.demo_commands(tmp_path / "bids", tmp_path / "out", tmp_path / "work", seed=3, nprocs=2)
    parsed = [build_parser().parse_args(argv) for _, argv in commands]
    assert [p.analysis_level for p in parsed] == ["participant", "group", "participant"]
    assert parsed[1].train_preset == "quick"
    assert parsed[0].model is None and parsed[2].model == tmp_path / "out" / "models"
    assert all(p.lesion_masks == tmp_path / "bids" / "derivatives" / "synthetic-truth" for p in parsed)


def _fake_run(monkeypatch, codes):
    calls: list[list[str]] = []

    def fake_main(argv):
        calls.append(argv)
        return codes[len(calls) - 1]

    def fake_generate(bids_dir, preset, seed):
        Path(bids_dir).mkdir(parents=True)
        (Path(bids_dir) / "dataset_description.json").write_text("{}")

    monkeypatch.setattr(demo, "bids_uad_main", fake_main)
    monkeypatch.setattr(demo, "generate_dataset", fake_generate)
    return calls


def test_demo_runs_the_three_levels_and_prints_the_evaluation(tmp_path, monkeypatch, capsys):
    calls = _fake_run(monkeypatch, [0, 0, 0])
    group = tmp_path / "demo" / "derivatives" / "bids_uad" / "group"
    group.mkdir(parents=True)
    (group / "detection_summary.tsv").write_text("detector\tauprc\nnormative\t0.9\n")
    assert demo.main(["--output", str(tmp_path / "demo")]) == 0
    assert len(calls) == 3
    out = capsys.readouterr().out
    assert "small preset" in out and "normative\t0.9" in out


def test_demo_stops_at_the_first_failing_step(tmp_path, monkeypatch, capsys):
    calls = _fake_run(monkeypatch, [0, 16, 0])
    assert demo.main(["--output", str(tmp_path / "demo"), "--preset", "tiny"]) == 16
    assert len(calls) == 2
    assert "failed with exit code 16" in capsys.readouterr().err
